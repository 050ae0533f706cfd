"""SGLang plugin of sglang-tca: registers the "tca" attention backend and radix cache, installs the patches
(patches/, which build TCA's KV pool and allocator in place of SGLang's), and validates server flags.

Reached three ways, all idempotent:
  * the entry point  [project.entry-points."sglang.srt.plugins"] tca = "sglang_tca.plugin:register"
    (SGLang's `load_plugins()` runs it in the launcher, the engine and every scheduler process);
  * `launch.py` / `sglang_tca.cli`, which calls `load_plugins()` then `register()` (works without pip install);
  * `run_scheduler_process` below, handed to `launch_server(..., run_scheduler_process_func=...)`, so that
    scheduler processes (started with *spawn*) register too.

Nothing here imports sglang at module level: spawned processes unpickle `run_scheduler_process` by importing this module.
"""
from __future__ import annotations

from sglang_tca.config import TCAConfigError

__all__ = ["register", "run_scheduler_process", "validate_server_args", "TCAConfigError", "BACKEND_NAME"]

BACKEND_NAME = "tca"
_registered = False

# KV-cache dtypes TCA keeps (16/32-bit floats); quantised caches (fp8, fp4, mxfp8, ...) are refused.
_OK_KV_DTYPES = {"auto", "bf16", "bfloat16", "fp16", "float16", "half", "float32", "fp32"}


# ---------------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------------
def _create_tca_backend(model_runner):
    from sglang_tca.serving.backend import TCAAttnBackend  # written separately; imported only when a model is served

    return TCAAttnBackend(model_runner)


def register() -> None:
    """Register the "tca" attention backend and radix cache, and install the patches (patches/). Idempotent."""
    global _registered
    if _registered:
        return
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, _current_plugin_source
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    import patches
    from sglang_tca.serving.memory import set_scheduler_env

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(_create_tca_backend)
    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, _create_tca_tree_cache)
    patches.install_all()
    if _current_plugin_source.get() is None:
        # Called directly (not by load_plugins(), which applies all hooks right after running its plugins).
        HookRegistry.apply_hooks()
    set_scheduler_env()
    _registered = True


def _create_tca_tree_cache(ctx):
    from sglang_tca.serving.radix import create_tree_cache

    return create_tree_cache(ctx)


def run_scheduler_process(*args, **kwargs):
    """Drop-in for sglang.srt.managers.scheduler.run_scheduler_process (same arguments): registers TCA in the
    spawned scheduler process, loads and checks the TCA config there, then runs the stock scheduler."""
    from sglang.srt.managers.scheduler import run_scheduler_process as stock
    from sglang.srt.plugins import load_plugins

    load_plugins()
    register()
    server_args = kwargs.get("server_args", args[0] if args else None)
    if server_args is not None and getattr(server_args, "attention_backend", None) == BACKEND_NAME:
        from sglang_tca.config import load_runtime

        load_runtime(server_args.model_path)  # fail fast, cached for the backend
    return stock(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# ServerArgs validation (runs after ServerArgs.__post_init__, i.e. once fully resolved, in the launching process)
# ---------------------------------------------------------------------------------------------------------------------
def validate_server_args(sa) -> None:
    """Raise TCAConfigError naming every flag that TCA cannot honour. No-op unless TCA is selected somewhere."""
    g = lambda name, default=None: getattr(sa, name, default)  # noqa: E731
    attn, prefill, decode, radix = g("attention_backend"), g("prefill_attention_backend"), \
        g("decode_attention_backend"), g("radix_cache_backend")
    problems: list[str] = []
    if attn != BACKEND_NAME:
        for flag, val in (("--prefill-attention-backend", prefill), ("--decode-attention-backend", decode)):
            if val == BACKEND_NAME:
                problems.append(f"{flag} tca (select TCA for both phases with --attention-backend tca)")
        if problems:
            raise TCAConfigError("TCA: " + "; ".join(problems))
        return

    def bad(cond, flag, why):
        if cond:
            problems.append(f"{flag} ({why})")

    bad(g("speculative_algorithm") is not None, f"--speculative-algorithm {g('speculative_algorithm')}",
        "speculative decoding")
    bad(bool(g("enable_dp_attention")), "--enable-dp-attention", "DP attention")
    bad(g("disaggregation_mode", "null") not in (None, "null"), f"--disaggregation-mode {g('disaggregation_mode')}",
        "PD disaggregation")
    bad(bool(g("enable_hierarchical_cache")), "--enable-hierarchical-cache", "hierarchical cache")
    bad(bool(g("enable_hisparse")), "--enable-hisparse", "hierarchical sparse attention")
    bad(bool(g("enable_two_batch_overlap")), "--enable-two-batch-overlap", "two-batch overlap")
    bad(bool(g("enable_mixed_chunk")), "--enable-mixed-chunk", "decode requests mixed into prefill batches")
    bad(prefill not in (None, BACKEND_NAME), f"--prefill-attention-backend {prefill}",
        "separate prefill/decode attention backends")
    bad(decode not in (None, BACKEND_NAME), f"--decode-attention-backend {decode}",
        "separate prefill/decode attention backends")
    kv_dtype = g("kv_cache_dtype", "auto")
    bad(kv_dtype not in _OK_KV_DTYPES, f"--kv-cache-dtype {kv_dtype}", "quantised KV cache; use auto, bf16 or fp16")
    from sglang_tca.config import load_runtime

    rt = load_runtime(sa.model_path)
    bad(g("page_size") != rt.block, f"--page-size {g('page_size')}",
        f"TCA's pages are its blocks: --page-size {rt.block} (launch.py sets it)")
    bad(rt.observe > 0, f"--tca-observe {rt.observe}",
        "the question-aware end of prompt needs the whole prompt's dense KV, which TCA frees")
    bad((g("dcp_size", 1) or 1) > 1, f"--dcp-size {g('dcp_size')}", "decode context parallelism")
    bad(bool(g("enable_prefill_cp")) or (g("attn_cp_size", 1) or 1) > 1, "--enable-prefill-cp/--attn-cp-size",
        "context parallelism")
    bad(bool(g("enable_lmcache")), "--enable-lmcache", "external KV offload")
    bad(bool(g("enable_flexkv")), "--enable-flexkv", "external KV offload")
    bad(radix != BACKEND_NAME, f"--radix-cache-backend {radix}",
        f"TCA shares compressed prefixes through its own radix cache: --radix-cache-backend {BACKEND_NAME} "
        f"(launch.py sets it)")
    bad(bool(g("enable_unified_memory")), "--enable-unified-memory", "TCA builds its own KV pool")
    if problems:
        raise TCAConfigError("--attention-backend tca does not support: " + "; ".join(problems)
                             + ". Remove these flags, or serve without TCA (--no-tca / another --attention-backend).")
