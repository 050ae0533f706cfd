"""SchedulerPoolStatsObserver._get_swa_token_info (AFTER): with TCA, the "full" use that SGLang logs ("#full token",
"full token usage"), exports (--enable-metrics) and reports (/v1/loads) counts the logical ids in use, and the usage
is their share of what the server could hold now (in use + free + evictable). SGLang's own figure would also count
the free ids that the compressed store cannot back (`store_held_tokens`): an idle server would read about half full.
The conservation check reads the free, evictable and protected sizes, which stay SGLang's."""
import dataclasses

from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = ("sglang.srt.managers.scheduler_components.pool_stats_observer.SchedulerPoolStatsObserver."
          "_get_swa_token_info")


def hook(result, self, *args, **kwargs):
    held = getattr(self.token_to_kv_pool_allocator, "store_held_tokens", None)
    if held is None:
        return result
    used = max(0, result.full_num_used - held())
    holdable = used + result.full_available_size + result.full_evictable_size
    return dataclasses.replace(result, full_num_used=used, full_token_usage=used / holdable if holdable else 0.0)


def install():
    install_hook(TARGET, hook, HookType.AFTER)
