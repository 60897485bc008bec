"""SAE training from chunks: identical to the tensor path when the chunks fit the buffer, and (streamed through a
small shuffle buffer) recovering planted features about as well as training in memory."""

from __future__ import annotations

import torch

from mamba_interp.sparse_autoencoder import ActivationChunks, SAEConfig, dictionary_recovery, planted_features, train_sae


def _cfg(**kw) -> SAEConfig:
    base = dict(d_in=16, d_sae=64, architecture="topk", k=2, steps=600, batch_size=128, seed=0, log_every=100)
    base.update(kw)
    return SAEConfig(**base)


def test_chunks_within_the_buffer_train_exactly_as_the_tensor():
    x = torch.randn(3000, 16)
    a = train_sae(x, _cfg(steps=50))
    b = train_sae(ActivationChunks.of(x, 700), _cfg(steps=50), buffer_tokens=4096)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert a.activation_scale == b.activation_scale


def test_gather_and_mean_of_chunks():
    x = torch.randn(1000, 5)
    src = ActivationChunks.of(x, 128)
    idx = torch.tensor([999, 0, 500, 500, 127, 128])
    assert torch.equal(src.gather(idx), x[idx])
    torch.testing.assert_close(src.mean(), x.double().mean(0))


def test_streaming_through_a_small_buffer_recovers_planted_features():
    data = planted_features(32, 16, 20_000, l0=2.0, seed=0)
    x = data.activations
    cfg = _cfg(d_sae=64, steps=800)
    in_memory = train_sae(x, cfg)
    streamed = train_sae(ActivationChunks.of(x, 1000), cfg, buffer_tokens=2000)  # a tenth of the data at a time
    ref = dictionary_recovery(data.features, in_memory.W_dec.detach()).mmcs
    got = dictionary_recovery(data.features, streamed.W_dec.detach()).mmcs
    print(f"MMCS streamed {got:.3f}, in memory {ref:.3f}")
    assert got > 0.9 and got > ref - 0.05, (got, ref)
