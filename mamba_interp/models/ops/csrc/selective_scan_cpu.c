/* Mamba-1 selective scan on the CPU, fused (Gu & Dao 2023, arXiv 2312.00752, Algorithm 2 / §3.3):

       h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_t        y_t = h_t C_t + D ⊙ u_t

   The torch loop (selective_scan.py) writes exp(ΔA), ΔBu and the states of each block to memory and reads
   them back, about nine passes over [block, b, e, n]; here a tile of W channels of one sequence keeps its
   state [n, W] in L1 and makes one pass over the inputs. Tiles are independent, so threads split them.

   Layouts (all float32, contiguous):
       u, delta, y, gy, g_u, g_delta   [b, l, e]
       At, g_At                        [n, e]      (A transposed, so a tile's W channels are contiguous)
       B, C, g_B, g_C                  [b, l, n]   (g_* of B, C, At: one slice per thread, summed by the caller)
       D                               [e]
       h0, h_last, gh_last, g_h0       [b, e, n]   (h0 / gh_last may be NULL: zero)
       ckpt                            [ceil(l / block), b, e, n]   the state before each block (NULL: not kept)

   The backward recomputes each block's states from its checkpoint with the same arithmetic as the forward,
   then runs the reverse scan  G_t = C_t gy_t + exp(Δ_{t+1} A) G_{t+1}  (G_t = dL/dh_t). */

#include <pthread.h>
#include <stdlib.h>

#define W 16         /* channels per tile: one AVX-512 vector of floats, two AVX2 vectors */
#define NMAX 256     /* the largest d_state taken (Mamba-1 checkpoints use 16) */
#define MAX_THREADS 256

/* exp, inlined so the tile loop vectorises (a libm call per lane costs more than the arithmetic).
   x = i ln2 + r with |r| <= ln2/2 (i by the round-to-nearest magic constant, exact for |x| < 2^22),
   Taylor to r^7 (truncation < 1e-8 relative), 2^i written into the exponent bits; clamped so that 2^i is a
   normal float: exp(x) for x < -87 returns exp(-87) = 1.6e-38 instead of a denormal or 0. NaN stays NaN. */
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    const float fi = (x * 1.44269504088896341f + magic) - magic;
    const float r = (x - fi * 0.693145751953125f) - fi * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int i; float f; } s;
    s.i = ((int)fi + 127) << 23;
    return p * s.f;
}

typedef struct {
    const float *u, *delta, *At, *B, *C, *D, *h0, *gy, *gh_last, *ckpt_in;
    float *y, *h_last, *ckpt, *g_u, *g_delta, *g_At, *g_B, *g_C, *g_h0;
    long b, l, e, n, block, item0, item1, thread;
    int status;
} scan_args;

/* A tile: sequence bi, channels e0 .. e0 + w - 1 (w <= W; lanes past w are zero and never stored). */
typedef struct {
    long bi, e0, w;
} tile;

static tile tile_of(const scan_args *a, long item) {
    const long tiles = (a->e + W - 1) / W;
    tile t = {item / tiles, (item % tiles) * W, 0};
    t.w = a->e - t.e0 < W ? a->e - t.e0 : W;
    return t;
}

static inline __attribute__((always_inline)) void load_state(float h[][W], const float *src, const scan_args *a,
                                                             tile tl, const long w) {
    for (long k = 0; k < a->n; k++)
        for (long j = 0; j < W; j++) h[k][j] = (j < w && src) ? src[(tl.bi * a->e + tl.e0 + j) * a->n + k] : 0.0f;
}

static inline __attribute__((always_inline)) void store_state(float *dst, float h[][W], const scan_args *a,
                                                              tile tl, const long w) {
    for (long j = 0; j < w; j++)
        for (long k = 0; k < a->n; k++) dst[(tl.bi * a->e + tl.e0 + j) * a->n + k] = h[k][j];
}

/* Δ_t and Δ_t u_t of the tile's lanes at step t. */
static inline __attribute__((always_inline)) void load_step(float dt[W], float x[W], const scan_args *a, long row,
                                                            const long w) {
    for (long j = 0; j < W; j++) {
        dt[j] = j < w ? a->delta[row + j] : 0.0f;
        x[j] = j < w ? dt[j] * a->u[row + j] : 0.0f;
    }
}

static inline __attribute__((always_inline)) void fwd_tile(const scan_args *a, tile tl, const long w,
                                                           float h[][W], float At[][W]) {
    const long l = a->l, e = a->e, n = a->n;
    load_state(h, a->h0, a, tl, w);
    for (long t = 0; t < l; t++) {
        if (a->ckpt && t % a->block == 0) store_state(a->ckpt + (t / a->block) * a->b * e * n, h, a, tl, w);
        const long row = (tl.bi * l + t) * e + tl.e0;
        const float *Bt = a->B + (tl.bi * l + t) * n, *Ct = a->C + (tl.bi * l + t) * n;
        float dt[W], x[W], acc[W] = {0};
        load_step(dt, x, a, row, w);
        for (long k = 0; k < n; k++) {
            const float bk = Bt[k], ck = Ct[k];
#pragma omp simd
            for (long j = 0; j < W; j++) {
                const float hv = exp_fast(dt[j] * At[k][j]) * h[k][j] + x[j] * bk;
                h[k][j] = hv;
                acc[j] += hv * ck;
            }
        }
        for (long j = 0; j < w; j++) a->y[row + j] = acc[j] + a->D[tl.e0 + j] * a->u[row + j];
    }
    store_state(a->h_last, h, a, tl, w);
}

/* hs: [block + 1][n][W] states (hs[0] the checkpoint), dAs: [block][n][W] decays. */
static inline __attribute__((always_inline)) void bwd_tile(const scan_args *a, tile tl, const long w,
                                                           float G[][W], float At[][W], float gA[][W],
                                                           float *hs, float *dAs) {
    const long l = a->l, e = a->e, n = a->n, T = a->block, nW = n * W;
    float *gB = a->g_B + a->thread * a->b * l * n, *gC = a->g_C + a->thread * a->b * l * n;
    load_state(G, a->gh_last, a, tl, w);
    for (long k = 0; k < n; k++)
        for (long j = 0; j < W; j++) gA[k][j] = 0.0f;
    for (long blk = (l + T - 1) / T - 1; blk >= 0; blk--) {
        const long t0 = blk * T, s = (t0 + T < l ? t0 + T : l) - t0;
        load_state((float(*)[W])hs, a->ckpt_in + blk * a->b * e * n, a, tl, w);
        for (long i = 0; i < s; i++) {  /* the forward's arithmetic, so the states are the forward's */
            const long t = t0 + i, row = (tl.bi * l + t) * e + tl.e0;
            const float *Bt = a->B + (tl.bi * l + t) * n;
            float dt[W], x[W];
            load_step(dt, x, a, row, w);
            float *hp = hs + i * nW, *hn = hs + (i + 1) * nW, *dA = dAs + i * nW;
            for (long k = 0; k < n; k++) {
                const float bk = Bt[k];
#pragma omp simd
                for (long j = 0; j < W; j++) {
                    const float d = exp_fast(dt[j] * At[k][j]);
                    dA[k * W + j] = d;
                    hn[k * W + j] = d * hp[k * W + j] + x[j] * bk;
                }
            }
        }
        for (long i = s - 1; i >= 0; i--) {
            const long t = t0 + i, row = (tl.bi * l + t) * e + tl.e0;
            const float *Bt = a->B + (tl.bi * l + t) * n, *Ct = a->C + (tl.bi * l + t) * n;
            float *gBt = gB + (tl.bi * l + t) * n, *gCt = gC + (tl.bi * l + t) * n;
            float dt[W], x[W], gyt[W], g_du[W] = {0}, g_d[W] = {0};
            load_step(dt, x, a, row, w);
            for (long j = 0; j < W; j++) gyt[j] = j < w ? a->gy[row + j] : 0.0f;
            const float *hp = hs + i * nW, *hn = hs + (i + 1) * nW, *dA = dAs + i * nW;
            for (long k = 0; k < n; k++) {
                const float bk = Bt[k], ck = Ct[k];
                float sc = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : sc, sb)
                for (long j = 0; j < W; j++) {
                    const float g = G[k][j] + gyt[j] * ck;               /* dL/dh_t */
                    const float p = g * dA[k * W + j] * hp[k * W + j];   /* dL/d(Δ_t A) */
                    sc += hn[k * W + j] * gyt[j];
                    sb += g * x[j];
                    g_du[j] += g * bk;
                    g_d[j] += p * At[k][j];
                    gA[k][j] += p * dt[j];
                    G[k][j] = dA[k * W + j] * g;                         /* carried to step t - 1 */
                }
                gCt[k] += sc;
                gBt[k] += sb;
            }
            for (long j = 0; j < w; j++) {
                const float uj = a->u[row + j];
                a->g_delta[row + j] = g_d[j] + g_du[j] * uj;
                a->g_u[row + j] = g_du[j] * dt[j] + gyt[j] * a->D[tl.e0 + j];
            }
        }
    }
    if (a->g_h0) store_state(a->g_h0, G, a, tl, w);
    float *gAt = a->g_At + a->thread * n * e;
    for (long k = 0; k < n; k++)
        for (long j = 0; j < w; j++) gAt[k * e + tl.e0 + j] += gA[k][j];
}

static inline __attribute__((always_inline)) void load_A(float At[][W], const scan_args *a, tile tl, const long w) {
    for (long k = 0; k < a->n; k++)
        for (long j = 0; j < W; j++) At[k][j] = j < w ? a->At[k * a->e + tl.e0 + j] : 0.0f;
}

static void *fwd_worker(void *p) {
    scan_args *a = p;
    float (*h)[W] = malloc(sizeof(float) * a->n * W), (*At)[W] = malloc(sizeof(float) * a->n * W);
    if (!h || !At) {
        a->status = 2;
    } else {
        for (long it = a->item0; it < a->item1; it++) {
            const tile tl = tile_of(a, it);
            load_A(At, a, tl, tl.w);
            if (tl.w == W) fwd_tile(a, tl, W, h, At);  /* constant width: no masks in the hot loop */
            else fwd_tile(a, tl, tl.w, h, At);
        }
    }
    free(h);
    free(At);
    return NULL;
}

static void *bwd_worker(void *p) {
    scan_args *a = p;
    const long nW = a->n * W;
    float (*G)[W] = malloc(sizeof(float) * nW), (*At)[W] = malloc(sizeof(float) * nW);
    float (*gA)[W] = malloc(sizeof(float) * nW);
    float *hs = malloc(sizeof(float) * (a->block + 1) * nW), *dAs = malloc(sizeof(float) * a->block * nW);
    if (!G || !At || !gA || !hs || !dAs) {
        a->status = 2;
    } else {
        for (long it = a->item0; it < a->item1; it++) {
            const tile tl = tile_of(a, it);
            load_A(At, a, tl, tl.w);
            if (tl.w == W) bwd_tile(a, tl, W, G, At, gA, hs, dAs);
            else bwd_tile(a, tl, tl.w, G, At, gA, hs, dAs);
        }
    }
    free(G);
    free(At);
    free(gA);
    free(hs);
    free(dAs);
    return NULL;
}

/* Split the b * ceil(e / W) tiles into `threads` contiguous ranges; 0 on success. */
static int run(scan_args *proto, long threads, void *(*worker)(void *)) {
    if (proto->n < 1 || proto->n > NMAX || proto->block < 1) return 1;
    const long items = proto->b * ((proto->e + W - 1) / W);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > items) threads = items;
    if (threads < 1) threads = 1;
    scan_args args[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (long i = 0; i < threads; i++) {
        args[i] = *proto;
        args[i].item0 = items * i / threads;
        args[i].item1 = items * (i + 1) / threads;
        args[i].thread = i;
        args[i].status = 0;
    }
    for (long i = 1; i < threads; i++) started[i] = pthread_create(&tid[i], NULL, worker, &args[i]) == 0;
    worker(&args[0]);
    int status = args[0].status;
    for (long i = 1; i < threads; i++) {
        if (started[i]) pthread_join(tid[i], NULL);
        else worker(&args[i]);  /* no thread: run its range here */
        if (args[i].status) status = args[i].status;
    }
    return status;
}

int scan_fwd(const float *u, const float *delta, const float *At, const float *B, const float *C, const float *D,
             const float *h0, float *y, float *h_last, float *ckpt, long b, long l, long e, long n, long block,
             long threads) {
    scan_args a = {0};
    a.u = u, a.delta = delta, a.At = At, a.B = B, a.C = C, a.D = D, a.h0 = h0;
    a.y = y, a.h_last = h_last, a.ckpt = ckpt;
    a.b = b, a.l = l, a.e = e, a.n = n, a.block = block;
    return run(&a, threads, fwd_worker);
}

/* g_At, g_B, g_C: [threads, ...] slices, zeroed by the caller; `threads` must match their first dimension. */
int scan_bwd(const float *u, const float *delta, const float *At, const float *B, const float *C, const float *D,
             const float *ckpt, const float *gy, const float *gh_last, float *g_u, float *g_delta, float *g_At,
             float *g_B, float *g_C, float *g_h0, long b, long l, long e, long n, long block, long threads) {
    scan_args a = {0};
    a.u = u, a.delta = delta, a.At = At, a.B = B, a.C = C, a.D = D, a.ckpt_in = ckpt, a.gy = gy;
    a.gh_last = gh_last, a.g_u = g_u, a.g_delta = g_delta, a.g_At = g_At, a.g_B = g_B, a.g_C = g_C;
    a.g_h0 = g_h0, a.b = b, a.l = l, a.e = e, a.n = n, a.block = block;
    return run(&a, threads, bwd_worker);
}
