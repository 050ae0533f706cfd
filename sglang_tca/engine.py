"""SGLang's offline `Engine` with TCA available: the in-process counterpart of `launch.py`.

    from sglang_tca.engine import Engine
    from sglang_tca.config import TCAConfig
    eng = Engine(model_path=DIR, tca=TCAConfig(budgets="b.json"), **any_server_args)

TCA is on when `attention_backend="tca"` or `tca=` is given (`tca=` implies `attention_backend="tca"`; with another
backend it is an error). With TCA on, before anything is spawned: the config (`tca`, or the defaults: budgets
discovered next to the model) is resolved against the model, the flags TCA refuses are checked
(`plugin.validate_server_args`, on the raw arguments and again on SGLang's resolved ServerArgs), the KV heads must
split over `tp_size`, and `disable_prefill_cuda_graph=True` is set (`plugin.PREFILL_GRAPH_REASON`; an explicit
`False` or another prefill graph backend is refused). Bad input raises TCAConfigError / BudgetsError (ValueErrors).

The config reaches the scheduler processes through the environment (`SGLANG_TCA_CONFIG`, pinned to the budgets file
that was checked, see `TCARuntime.handoff`): it is set only while this engine starts its processes (which copy the
environment when they are spawned), under a process-wide lock, and the previous value is restored afterwards, also
when the start fails. So engines constructed in one process, one after the other or from several threads (those
start one at a time), each serve their own config.
"""
from __future__ import annotations

import contextlib
import os
import threading
import types

from sglang.srt.entrypoints.engine import Engine as _SGLangEngine

from sglang_tca import plugin
from sglang_tca.config import ENV_VAR, TCAConfig, TCAConfigError

_SPAWN_LOCK = threading.Lock()   # one engine at a time sets ENV_VAR and spawns its processes


class Engine(_SGLangEngine):
    run_scheduler_process_func = staticmethod(plugin.run_scheduler_process)

    def __init__(self, *, tca: TCAConfig | None = None, **kwargs):
        plugin.register()
        kwargs, handoff = _checked(tca, kwargs)
        with _SPAWN_LOCK, _env_config(handoff):
            super().__init__(**kwargs)


def _checked(tca: TCAConfig | None, kwargs: dict) -> tuple[dict, TCAConfig | None]:
    """(the keyword arguments for SGLang's Engine, the config for the scheduler processes or None when TCA is off)."""
    if tca is not None and not isinstance(tca, TCAConfig):
        raise TypeError(f"tca must be a sglang_tca.config.TCAConfig, got {type(tca).__name__}")
    kwargs = dict(kwargs)
    sa = kwargs.get("server_args")   # SGLang's Engine also takes resolved ServerArgs instead of keywords
    if sa is None and not kwargs.get("model_path"):
        raise TypeError("sglang_tca.engine.Engine needs model_path= (a model directory, GGUF file or HF repo id)")
    backend = sa.attention_backend if sa is not None else kwargs.get("attention_backend")
    if tca is not None and backend is None and sa is None:
        kwargs["attention_backend"] = backend = plugin.BACKEND_NAME
    if backend != plugin.BACKEND_NAME:
        if tca is not None:
            raise TCAConfigError(f"tca= is given but attention_backend is {backend!r}; use attention_backend='tca' "
                                 f"(or leave it out), or drop tca= to serve without TCA")
        return kwargs, None
    runtime = (tca or TCAConfig()).resolve(sa.model_path if sa is not None else kwargs["model_path"])
    if sa is None:
        if kwargs.get("disable_prefill_cuda_graph", True) is not True:
            raise TCAConfigError(f"disable_prefill_cuda_graph={kwargs['disable_prefill_cuda_graph']!r}: TCA runs "
                                 f"with the prefill CUDA graph disabled ({plugin.PREFILL_GRAPH_REASON})")
        kwargs["disable_prefill_cuda_graph"] = True
        kwargs.setdefault("page_size", runtime.block)                   # TCA's memory: pages are its blocks,
        kwargs.setdefault("radix_cache_backend", plugin.BACKEND_NAME)   # and its radix cache
        plugin.validate_server_args(types.SimpleNamespace(**kwargs), runtime)   # ours before SGLang's asserts
        tp_size = kwargs.get("tp_size", 1)
    else:
        plugin.validate_server_args(sa, runtime)
        tp_size = sa.tp_size
    runtime.for_rank(0, tp_size)   # KV heads must split (or replicate) over tp_size
    return kwargs, runtime.handoff()


@contextlib.contextmanager
def _env_config(cfg: TCAConfig | None):
    """ENV_VAR holds `cfg` (or is unset) while the block spawns processes; its previous value is restored after."""
    previous = os.environ.get(ENV_VAR)
    if cfg is None:
        os.environ.pop(ENV_VAR, None)
    else:
        cfg.to_env(os.environ)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
