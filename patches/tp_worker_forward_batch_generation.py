"""TpModelWorker.forward_batch_generation (AFTER): once a forward's kernels are enqueued, let TCA's backend start
copying its new records' row counts to the host; the reservations travel with the batch result to
`Scheduler.process_batch_result`, where they are settled (patches/scheduler_process_batch_result.py)."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"


def hook(result, self, *args, **kwargs):
    finish = getattr(self.model_runner.attn_backend, "finish_forward", None)
    if finish is not None and result is not None:
        result.tca_pending = finish()
    return result


def install():
    install_hook(TARGET, hook, HookType.AFTER)
