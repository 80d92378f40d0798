"""The mp4 settings every sampler writes, without torch or PyAV, so that run manifests can record them cheaply."""

from __future__ import annotations

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
DEFAULT_CRF = 17
DEFAULT_PRESET = "medium"
# off: x264's AVX-512 macroblock-tree code encodes some clips differently from one call to the next
DEFAULT_MACROBLOCK_TREE = False
# what the samplers' `video.encode_mp4` calls write: other settings give other bytes, and the scorers other scores
MP4_ENCODING = {"codec": CODEC, "pix_fmt": PIXEL_FORMAT, "crf": DEFAULT_CRF, "preset": DEFAULT_PRESET,
                "macroblock_tree": DEFAULT_MACROBLOCK_TREE}
