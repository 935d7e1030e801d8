"""``python -m agent.llm.llama_server ARGS``: llama-cpp-python's OpenAI-compatible server for ``--llm-url``.

The same arguments as ``python -m llama_cpp.server`` (``--model PATH.gguf --port 8080 ...``), with
csm-chat's llama.cpp CPU decision in force (``agent.llm.llama_cpu``: no weight repacking on AMX
CPUs, where llama.cpp crashes on multi-token prompts; ``CSM_LLAMA_REPACK`` = auto | on | off).
The server has no setting for it, so this launcher puts it in force in the server's process and
then runs the server's own ``main``.
"""

from __future__ import annotations

import logging
import sys


def main() -> None:
    from agent.errors import AgentError
    from agent.llm.llama_cpu import decide_repack, install_repack_setting

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        decision = decide_repack()
        import llama_cpp.server.__main__ as server
    except AgentError as error:
        sys.exit(f"llama_server: {error}")
    except ImportError:
        sys.exit("llama_server: llama-cpp-python's server is not installed: pip install 'llama-cpp-python[server]'")
    install_repack_setting(decision)
    sys.argv[0] = "python -m agent.llm.llama_server"
    server.main()


if __name__ == "__main__":
    main()
