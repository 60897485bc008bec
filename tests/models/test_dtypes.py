"""bf16 / fp16 models keep the SSM state in float32 and stay within a stated tolerance of float32."""

import copy

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from tests.models.helpers import perturb, rel_err

# max |logits_lowp - logits_fp32| / max |logits_fp32| on a 3-layer d_model 64 model, L = 200
# (measured 0.011 / 0.024 for bf16 Mamba-1 / Mamba-2, 0.0015 / 0.0027 for fp16)
TOL = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_close_to_float32(arch, dtype):
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(arch=arch, d_model=64, n_layer=3, vocab_size=50, headdim=16))
    perturb(model)
    x = torch.randint(0, 50, (2, 200), generator=torch.Generator().manual_seed(1))
    ref = model(x)
    low = copy.deepcopy(model).to(dtype)
    logits, cache = low.run_with_cache(x, names_filter=["blocks.0.mixer.hook_ssm_state", "blocks.0.mixer.hook_y"])
    assert logits.dtype == torch.float32
    assert cache["ssm_state", 0].dtype == torch.float32  # state accumulates in float32
    assert cache["y", 0].dtype == dtype
    assert rel_err(low(x), ref) <= TOL[dtype]
    assert rel_err(logits, ref) <= TOL[dtype]
