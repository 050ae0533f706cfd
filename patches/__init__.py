"""SGLang monkeypatches of sglang-tca: one module per patched SGLang target, each version-checked.

Every patch module names its TARGET, defines its hook and an `install()` that calls

    from patches import install_hook
    install_hook(TARGET, hook, HookType.AFTER)

which checks the installed SGLang version first (`require_sglang`), so that a different SGLang fails loudly at start
instead of silently mis-patching, and registers the hook with SGLang's HookRegistry (so it also reaches the spawned
scheduler processes, which run `sglang_tca.plugin.register()`). `install_all()` installs every patch; hooks only act
when --attention-backend tca is selected.
"""
from __future__ import annotations

import importlib

SUPPORTED_SGLANG = "0.5.17"

# One module per target (patches/<module>.py); the order does not matter.
PATCH_MODULES = (
    "server_args_post_init",
    "kv_cache_configurator_derive_pool_sizes",
    "kv_cache_configurator_build_token_to_kv_pool",
    "kv_cache_configurator_build_token_to_kv_pool_allocator",
    "kv_cache_builder_build_kv_cache",
    "tp_worker_forward_batch_generation",
    "scheduler_process_batch_result",
    "schedule_batch_check_decode_mem",
    "scheduler_get_internal_state",
    "pool_stats_observer_get_swa_token_info",
    "tp_worker_get_worker_info",
    "forward_batch_info_init_new",
    "schedule_batch_evict_swa",
    "schedule_policy_add_one_req",
    "schedule_policy_add_chunked_req",
)


class SGLangVersionError(RuntimeError):
    """The installed SGLang is not the version a patch was written for."""


def installed_sglang_version() -> str | None:
    """The installed sglang version, without importing sglang (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def require_sglang(version: str = SUPPORTED_SGLANG, target: str = "") -> str:
    """Raise SGLangVersionError unless the installed sglang is exactly `version`; `target` names the patched
    SGLang object for the message. Returns the installed version."""
    have = installed_sglang_version()
    if have != version:
        what = f"the patch of {target}" if target else "this patch"
        found = f"sglang {have} is installed" if have else "sglang is not installed"
        raise SGLangVersionError(f"{what} was written for sglang {version}, but {found}; "
                                 f"install sglang=={version} or port the patch (see patches/README.md)")
    return have


def install_hook(target: str, hook, hook_type) -> None:
    """Register `hook` on `target` with SGLang's HookRegistry (idempotent). When another plugin already patched the
    target, wrap ours on top right away (HookRegistry.apply_hooks skips patched targets)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    require_sglang(SUPPORTED_SGLANG, target)
    if any(h is hook for _, h, _ in HookRegistry._hooks.get(target, [])):
        return
    already_patched = target in HookRegistry._patched
    HookRegistry.register(target, hook, hook_type)
    if already_patched:
        HookRegistry._apply_target(target, [(hook_type, hook, None)])


def install_all() -> None:
    for name in PATCH_MODULES:
        importlib.import_module(f"patches.{name}").install()
