"""ForwardBatch.init_new (AFTER): an extend batch with prefills that observe (--tca-observe) carries them to TCA's
attention backend as `tca_observe`, (batch index, request row, `req.tca_observe_end`) each; the backend observes in
the forward whose extend of that request ends there."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"


def hook(result, cls, batch, *args, **kwargs):
    if result.forward_mode.is_extend():
        observing = [(i, r.req_pool_idx, r.tca_observe_end) for i, r in enumerate(batch.reqs)
                     if getattr(r, "tca_observe_end", 0)]
        if observing:
            result.tca_observe = observing
    return result


def install():
    install_hook(TARGET, hook, HookType.AFTER)
