"""PrefillAdder.add_one_req (AROUND): a new prefill that observes (--tca-observe) gets no chunk that ends inside
its last N tokens (`ObserveRule.chunk_limit`): it either fits whole or its chunk stops at or before P0. Its room is
worked out as SGLang's add_one_req works it out (the chunk budget, lowered by the SWA pool's cap when that is short);
a page-rounded extend above it is what SGLang would truncate."""
from sglang.srt.managers.schedule_policy import AddReqResult
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook
from sglang_tca.serving.observe import add_with_chunk_limit
from sglang_tca.serving.radix import observing

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"


def room(adder, req) -> int:
    """The most tokens SGLang's add_one_req lets this request's chunk take without truncating it."""
    out = adder.rem_chunk_tokens
    if adder.is_hybrid_swa:
        extend = adder.ceil_paged_tokens(len(req.full_untruncated_fill_ids) - len(req.prefix_indices)
                                         - req.host_hit_length)
        new = adder._swa_new_tokens(req)
        if adder._swa_budget_for_req(extend, new, swa_host_hit_length=req.swa_host_hit_length) >= adder.rem_swa_tokens:
            out = min(out, adder._swa_chunk_cap(new, req.swa_host_hit_length))
    return out // adder.page_size * adder.page_size


def hook(original, self, req, *args, **kwargs):
    if not observing(req) or self.rem_chunk_tokens is None:
        return original(self, req, *args, **kwargs)
    return add_with_chunk_limit(self, req, room(self, req), lambda: original(self, req, *args, **kwargs),
                                AddReqResult.OTHER)


def install():
    install_hook(TARGET, hook, HookType.AROUND)
