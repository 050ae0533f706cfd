"""SGLang plugin of sglang-tca: registers the "tca" attention backend and radix cache, installs the patches
(patches/, which build TCA's KV pool and allocator in place of SGLang's and validate server flags), and holds the
validation of server flags (`validate_server_args`).

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
# Why launch.py and sglang_tca.engine.Engine turn SGLang's default prefill CUDA graph off for TCA, and the hook
# below refuses any other prefill graph backend.
PREFILL_GRAPH_REASON = ("TCA's prefill metadata has data-dependent sizes computed on the host per batch, and no GPU "
                        "check has run TCA under a prefill CUDA graph")
DISABLE_PREFILL_GRAPH_FLAG = "--disable-prefill-cuda-graph"
_CHECKED_DECODE_GRAPHS = ("full", "disabled")   # decode CUDA graphs (SGLang's default) were GPU-checked, or none


def validate_server_args(sa, runtime=None) -> None:
    """Raise TCAConfigError naming every flag that TCA cannot honour. No-op unless TCA is selected somewhere.

    The rule is allowed = GPU-checked with TCA (README, "What TCA serves with"): every mode that builds several
    attention backends, routes attention around ours, changes the KV layout our kernels read, or simply has not been
    run with TCA on a GPU is refused. `sa` is a resolved ServerArgs (the __post_init__ hook), or the raw values the
    user gave (an argparse Namespace or any object with those attributes; launch.py and the Engine check them first,
    so that our line comes before SGLang's own assertions). Missing attributes read as SGLang's defaults; the CUDA
    graph backends are only known once resolved, so they are checked on a ServerArgs only. The memory rules (page
    size = the budgets' block, TCA's radix cache, --tca-observe's chunk and parallelism) need TCA's config:
    `runtime` (a TCARuntime), or the one the scheduler processes will load for `sa.model_path`; without either they
    are not checked."""
    from sglang.srt.server_args import ServerArgs

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

    # several attention backends, or attention that bypasses ours
    bad(g("speculative_algorithm") is not None, f"--speculative-algorithm {g('speculative_algorithm')}",
        "speculative decoding")
    bad(bool(g("enable_pdmux")), "--enable-pdmux", "PD multiplexing builds one attention backend per SM group")
    bad(prefill not in (None, BACKEND_NAME), f"--prefill-attention-backend {prefill}",
        "separate prefill/decode attention backends")
    bad(decode not in (None, BACKEND_NAME), f"--decode-attention-backend {decode}",
        "separate prefill/decode attention backends")
    bad(bool(g("enable_deterministic_inference")) or g("rl_on_policy_target") is not None,
        "--enable-deterministic-inference/--rl-on-policy-target", "deterministic inference swaps in its own kernels")
    bad(bool(g("enable_mis")), "--enable-mis", "multi-item scoring needs custom attention masks")
    bad(g("dllm_algorithm") is not None, f"--dllm-algorithm {g('dllm_algorithm')}", "diffusion LLM decoding")
    bad(bool(g("is_embedding")), "--is-embedding", "embedding serving is not GPU-checked with TCA")
    # parallelism and disaggregation
    bad(bool(g("enable_dp_attention")), "--enable-dp-attention", "DP attention")
    bad((g("dp_size", 1) or 1) > 1, f"--dp-size {g('dp_size')}", "data-parallel replicas are not GPU-checked with TCA")
    bad((g("pp_size", 1) or 1) > 1, f"--pp-size {g('pp_size')}", "pipeline parallelism")
    bad((g("dcp_size", 1) or 1) > 1, f"--dcp-size {g('dcp_size')}", "decode context parallelism")
    bad(bool(g("enable_prefill_cp")) or (g("attn_cp_size", 1) or 1) > 1, "--enable-prefill-cp/--attn-cp-size",
        "context parallelism")
    bad(g("disaggregation_mode", "null") not in (None, "null"), f"--disaggregation-mode {g('disaggregation_mode')}",
        "PD disaggregation")
    bad(bool(g("language_only")), "--language-only", "encoder disaggregation")
    # execution modes: batch overlap, compilation, CUDA graphs, chunking
    bad(bool(g("enable_two_batch_overlap")), "--enable-two-batch-overlap", "two-batch overlap")
    bad(bool(g("enable_single_batch_overlap")), "--enable-single-batch-overlap", "single-batch overlap")
    bad(bool(g("enable_torch_compile")), "--enable-torch-compile", "torch.compile of the model")
    bad(bool(g("enable_mixed_chunk")), "--enable-mixed-chunk", "decode requests mixed into prefill batches")
    workers = g("tokenizer_worker_num", 1) or 1
    bad(workers > 1, f"--tokenizer-worker-num {workers}",
        "several tokenizer workers are not GPU-checked with TCA, and their HTTP apps lack TCA's request-body check")
    chunk = g("chunked_prefill_size")
    bad(chunk is not None and chunk <= 0, f"--chunked-prefill-size {chunk}",
        "chunked prefill off (set by the flag, or by SGLang for this model); TCA is GPU-checked with chunking on")
    graphs = g("cuda_graph_config") if isinstance(sa, ServerArgs) else None
    if graphs is not None:
        bad(graphs.prefill.backend != "disabled",
            f"prefill CUDA graph backend {graphs.prefill.backend} (--cuda-graph-backend-prefill/--cuda-graph-config)",
            f"{PREFILL_GRAPH_REASON}; use {DISABLE_PREFILL_GRAPH_FLAG}")
        bad(graphs.decode.backend not in _CHECKED_DECODE_GRAPHS,
            f"decode CUDA graph backend {graphs.decode.backend} (--cuda-graph-backend-decode/--cuda-graph-config)",
            "only full decode CUDA graphs (the default) or none are GPU-checked with TCA")
    # the KV cache our kernels read and the radix cache our selections live in
    kv_dtype = g("kv_cache_dtype", "auto")
    bad(kv_dtype not in _OK_KV_DTYPES, f"--kv-cache-dtype {kv_dtype}", "quantised KV cache; use auto, bf16 or fp16")
    from sglang_tca.config import load_runtime

    # the rules that need TCA's config: given, or the one the scheduler processes will load for this model
    rt = runtime if runtime is not None else load_runtime(g("model_path")) if g("model_path") else None
    if rt is not None:
        bad(g("page_size") != rt.block, f"--page-size {g('page_size')}",
            f"TCA's pages are its blocks: --page-size {rt.block} (launch.py and the Engine set it)")
        if rt.observe > 0:       # a prompt's last N queries come in one chunk, one rank sees every KV head's choice
            need = rt.observe + rt.block
            bad(chunk is not None and 0 < chunk < need, f"--chunked-prefill-size {chunk} with --tca-observe "
                f"{rt.observe}", f"a prompt's last chunk holds its last N queries: at least N + block = {need}")
            bad((g("tp_size", 1) or 1) > 1, f"--tp-size {g('tp_size')} with --tca-observe",
                "the question-aware end of prompt is not GPU-checked with tensor parallelism")
            bad(rt.policy == "streaming", "--tca-policy streaming with --tca-observe",
                "streaming keeps no compressed token to re-choose")
            bad(bool(g("enable_streaming_session")), "--enable-streaming-session with --tca-observe",
                "session caching bypasses the rule that an observing prompt neither matches nor inserts")
        bad(radix != BACKEND_NAME, f"--radix-cache-backend {radix}",
            f"TCA shares compressed prefixes through its own radix cache: --radix-cache-backend {BACKEND_NAME} "
            f"(launch.py and the Engine set it)")
    bad(bool(g("enable_page_major_kv_layout")) or bool(g("enable_unified_memory")),
        "--enable-page-major-kv-layout/--enable-unified-memory", "another KV layout than the one TCA's kernels read")
    bad(bool(g("enable_hierarchical_cache")), "--enable-hierarchical-cache", "hierarchical cache")
    bad(bool(g("enable_hisparse")), "--enable-hisparse", "hierarchical sparse attention")
    bad(bool(g("enable_lmcache")), "--enable-lmcache", "external KV offload")
    bad(bool(g("enable_flexkv")), "--enable-flexkv", "external KV offload")
    bad(bool(g("enable_memory_saver")), "--enable-memory-saver",
        "releasing and resuming GPU memory is not GPU-checked with TCA, whose store tables describe the KV it frees")
    if problems:
        raise TCAConfigError("--attention-backend tca does not support: " + "; ".join(problems)
                             + ". Remove these flags, or serve without TCA (--no-tca / another --attention-backend).")
