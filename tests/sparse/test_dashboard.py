"""The dashboards' measured logit effect against the brute-force pass (full logits of the whole batch)."""

from __future__ import annotations

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.sparse_autoencoder import SAEConfig, SparseAutoencoder, ablate_latents, run_with_saes
from mamba_interp.sparse_autoencoder.dashboard import ablation_logit_effect


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_ablation_logit_effect_at_its_positions_equals_the_full_logits(arch):
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(arch=arch, d_model=16, n_layer=3, vocab_size=40, d_state=8, headdim=8)
                        ).double().eval()
    tokens = torch.randint(0, 40, (6, 10))
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[2, :3] = 0  # a left-padded row
    name, layer = "blocks.1.mixer.hook_x", 1
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=48, architecture="topk", k=6, seed=1)).double()
    with torch.no_grad():
        f = sae.encode(model.run_with_cache(tokens, attention_mask=mask, names_filter=name)[1][name].reshape(6, 10, -1))
    latent = int((f > 0).sum((0, 1)).argmax())  # a latent that fires
    seqs, pos = [4, 2, 4, 0], [9, 5, 3, 7]
    with torch.no_grad():
        clean = model(tokens, attention_mask=mask)
        ablated = run_with_saes(model, tokens, attention_mask=mask, saes={name: sae}, use_error_term=True,
                                latent_edits={name: ablate_latents([latent])})
    brute = (clean[seqs, pos] - ablated[seqs, pos]).mean(0)[:40]
    assert brute.abs().max() > 1e-6
    expected = [[str(int(i)), round(float(v), 4)] for v, i in zip(*brute.topk(8))]
    start = (layer, model(tokens, attention_mask=mask, stop_at_layer=layer))
    finals = []
    with torch.no_grad(), model.hooks([("hook_norm_final", lambda t, hook: finals.append(t.clone()))]):
        model(tokens, attention_mask=mask)
    for kw in ({}, {"start": start}, {"start": start, "clean_final": finals[0]}):
        effect = ablation_logit_effect(model, sae, name, tokens, seqs, pos, latent, str, attention_mask=mask, **kw)
        assert effect["kind"] == "ablation"
        assert [t for t, _ in effect["promoted"]] == [t for t, _ in expected]
        assert [v for _, v in effect["promoted"]] == pytest.approx([v for _, v in expected], abs=2e-4)
