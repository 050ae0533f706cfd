"""SGLang's offline `Engine` with TCA available: the in-process counterpart of `launch.py`.

    from sglang_tca.engine import Engine
    from sglang_tca.config import TCAConfig
    eng = Engine(model_path=DIR, attention_backend="tca", tca=TCAConfig(budgets="b.json"), **any_server_args)

`tca` (optional) is put in the environment (`SGLANG_TCA_CONFIG`) for the scheduler processes this engine spawns,
after checking it against the model; without it they use the defaults (budgets discovered next to the model).
"""
from __future__ import annotations

import os

from sglang.srt.entrypoints.engine import Engine as _SGLangEngine

from sglang_tca import plugin
from sglang_tca.config import ENV_VAR, TCAConfig


class Engine(_SGLangEngine):
    run_scheduler_process_func = staticmethod(plugin.run_scheduler_process)

    def __init__(self, *, tca: TCAConfig | None = None, **kwargs):
        plugin.register()
        if tca is None:
            os.environ.pop(ENV_VAR, None)
        else:
            if kwargs.get("attention_backend") == "tca":
                tca.resolve(kwargs["model_path"])          # bad budgets / window: a clear error here, not in a child
            tca.to_env(os.environ)
        if kwargs.get("attention_backend") == "tca":          # TCA's memory: pages are blocks, its radix cache
            from sglang_tca.config import load_runtime

            kwargs.setdefault("page_size", load_runtime(kwargs["model_path"]).block)
            kwargs.setdefault("radix_cache_backend", plugin.BACKEND_NAME)
        super().__init__(**kwargs)
