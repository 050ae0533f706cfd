"""ServerArgs.__post_init__ (AFTER): once SGLang has resolved the server arguments, refuse every flag TCA cannot
honour (`sglang_tca.plugin.validate_server_args`) and point SGLang at TCA's radix cache."""
from sglang.srt.plugins.hook_registry import HookType

from patches import install_hook

TARGET = "sglang.srt.server_args.ServerArgs.__post_init__"


def hook(result, self, *args, **kwargs):
    from sglang_tca.plugin import validate_server_args

    validate_server_args(self)
    return result


def install():
    install_hook(TARGET, hook, HookType.AFTER)
