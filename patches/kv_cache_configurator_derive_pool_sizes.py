"""KVCacheConfigurator._derive_pool_sizes (AFTER): with TCA, split SGLang's dense KV budget into TCA's dense pool,
compressed store and tables (`sglang_tca.serving.memory.plan_for`), and report the logical ids as the pool size."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._derive_pool_sizes"


def hook(sizes, self, *args, config, **kwargs):
    from sglang_tca.serving import memory

    if not memory.uses_tca(self):
        return sizes
    import msgspec

    plan = memory.plan_for(self, config)
    memory.remember_plan(self, plan)
    return msgspec.structs.replace(sizes, max_total_num_tokens=plan.logical_tokens,
                                   full_max_total_num_tokens=plan.logical_tokens,
                                   swa_max_total_num_tokens=plan.dense_tokens)


def install():
    install_hook(TARGET, hook, HookType.AFTER)
