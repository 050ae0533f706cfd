"""KVCacheConfigurator._build_token_to_kv_pool (AROUND): with TCA, build TCA's pool (dense buffers and compressed
store in one arena, `sglang_tca.serving.pool.TCAKVPool`) instead of SGLang's MHA pool."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool"


def hook(original, self, *args, **kwargs):
    from sglang_tca.serving import memory

    if not memory.uses_tca(self):
        return original(self, *args, **kwargs)
    return memory.build_pool(self)


def install():
    install_hook(TARGET, hook, HookType.AROUND)
