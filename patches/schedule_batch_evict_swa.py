"""ScheduleBatch._evict_swa (AROUND): a prefill that observes (--tca-observe) keeps its prompt dense until its end,
so the chunk cache's prefill-time frees of out-of-window dense slots (SGLang's maybe_evict_swa in extend mode, with
--disable-radix-cache) skip it; its decode steps free them as for any request. The radix cache's prefill frees are
skipped in TCARadixCache.cache_unfinished_req."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook
from sglang_tca.serving.radix import observing

TARGET = "sglang.srt.managers.schedule_batch.ScheduleBatch._evict_swa"


def hook(original, self, req, pre_len, *args, **kwargs):
    if self.forward_mode.is_extend() and observing(req):
        return None
    return original(self, req, pre_len, *args, **kwargs)


def install():
    install_hook(TARGET, hook, HookType.AROUND)
