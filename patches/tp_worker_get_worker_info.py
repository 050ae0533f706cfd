"""TpModelWorker.get_worker_info (AFTER): with TCA, the longest request SGLang accepts (its max_req_len and
max_req_input_len: the scheduler refuses longer inputs in validate_input_length, or truncates them with
--allow-auto-truncate, and clips max_new_tokens to max_req_len) is also bounded by what the compressed store admits
and holds for one sequence at its worst case (`CompressedStore.longest_sequence`). SGLang bounds it by its logical
ids, of which TCA has more than the store can back; a longer prompt could wait unadmitted at the head of the queue,
or stall mid-prefill holding the whole store, instead of getting SGLang's "Input length ... exceeds the maximum
allowed length" error."""
import logging

from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.get_worker_info"
MAX_REQ_LEN, MAX_REQ_INPUT_LEN = 4, 5          # their places in get_worker_info's tuple
INPUT_MARGIN = 5                               # SGLang's max_req_input_len = max_req_len - 5

logger = logging.getLogger(__name__)


def hook(result, self, *args, **kwargs):
    store = getattr(self.model_runner.token_to_kv_pool_allocator, "store", None)
    if store is None or result is None:
        return result
    longest = store.longest_sequence() - 1
    if longest >= result[MAX_REQ_LEN]:
        return result
    out = list(result)
    out[MAX_REQ_LEN], out[MAX_REQ_INPUT_LEN] = longest, longest - INPUT_MARGIN
    logger.info(f"TCA: requests are limited to {longest} tokens (prompt and output), what the compressed store holds "
                f"for one sequence when every block keeps its largest count; a larger KV budget raises it")
    return tuple(out)


def install():
    install_hook(TARGET, hook, HookType.AFTER)
