"""SGLang monkeypatches of sglang-tca: one module per patched SGLang target, each version-checked.

Every patch module starts with

    from patches import require_sglang
    require_sglang("0.5.17", target="sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free")

so that a different SGLang fails loudly at import instead of silently mis-patching.
"""
from __future__ import annotations

SUPPORTED_SGLANG = "0.5.17"


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
