"""Silence third-party import-time noise before peft and diffusers load."""

import logging

# bitsandbytes >= 0.50 (imported by peft and diffusers when installed) warns on import, on
# CPUs with AVX512-BF16, that it cannot fetch an optional 4-bit kernel from the Hub. Nothing
# here uses 4-bit layers, and the line would come before every CLI's one-line "error: ...".
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
