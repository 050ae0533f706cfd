"""PrefillAdder.add_chunked_req (AROUND): the next chunk of a prefill that observes (--tca-observe) either takes the
whole rest or stops at or before P0 (`ObserveRule.chunk_limit`); when only the rest may come and it does not fit,
the request waits this round, as SGLang's hybrid-SWA path does when no token fits."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook
from sglang_tca.serving.observe import add_with_chunk_limit
from sglang_tca.serving.radix import observing

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req"


def room(adder) -> int:
    """The most tokens SGLang's add_chunked_req lets the chunk take (its own formula, hybrid SWA)."""
    out = min(adder.rem_chunk_tokens, int(adder.rem_total_tokens))
    if adder.is_hybrid_swa:
        out = min(out, int(adder.rem_swa_tokens) - adder.page_size)
    return out


def hook(original, self, req, *args, **kwargs):
    if not observing(req) or self.rem_chunk_tokens is None or self.dllm_config is not None:
        return original(self, req, *args, **kwargs)
    return add_with_chunk_limit(self, req, room(self), lambda: original(self, req, *args, **kwargs), req)


def install():
    install_hook(TARGET, hook, HookType.AROUND)
