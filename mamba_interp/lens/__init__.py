"""Reading the residual stream through the unembedding, and what each component writes there: the logit lens,
the tuned lens (Belrose et al. 2023), direct logit attribution through the final RMSNorm, and layer / mixer-component
ablation. Functions take a ``HookedMamba`` and tensors (or a ``TaskBatch``)::

    from mamba_interp.lens import TunedLens, direct_logit_attribution, layer_ablation, logit_lens

    ll = logit_lens(model, ids, targets)                  # LensResult: kl [k, b, l], target_rank, ...
    ll.kl_by_layer(), ll.accuracy_by_layer()              # [k] per residual entry (embedding ... final)
    lens = TunedLens.for_model(model); lens.fit(model, train_ids); lens.kl_by_layer(model, test_ids)
    dla = direct_logit_attribution(model, ids, answer, wrong="mean", units=True)
    dla.contributions["blocks.1.mixer"], dla.units["blocks.1.mixer"]   # [b], [b, e or h]
    layer_ablation(model, batch, kind="mean")             # loss / accuracy change per layer and component
"""

from mamba_interp.lens.ablation import ABLATION_KINDS, COMPONENT_HOOKS, AblationEffect, layer_ablation
from mamba_interp.lens.attribution import DLAResult, dla_at, direct_logit_attribution
from mamba_interp.lens.logit_lens import LensResult, logit_lens, unembed
from mamba_interp.lens.tuned_lens import TunedLens, TunedLensConfig, TunedLensFit

__all__ = [
    "ABLATION_KINDS", "COMPONENT_HOOKS", "AblationEffect", "DLAResult", "LensResult", "TunedLens", "TunedLensConfig",
    "TunedLensFit", "direct_logit_attribution", "dla_at", "layer_ablation", "logit_lens", "unembed",
]
