"""Codecs: how compressed keys and values are stored as bytes. Each module registers one codec (a recipe with a
declared layout, see `base`); `store.PagedStore` holds a codec's fields in pages."""
from .base import BIT_WIDTHS, CODECS, PARTS, Codec, Field, Layout, get_codec, make_codec, register_codec
from .exact import ExactCodec
from .gear import GearCodec
from .projected import ProjectedCodec
from .quant import GroupCodec
from .rotation import RotationCodec
from .store import PagedStore

__all__ = ["BIT_WIDTHS", "CODECS", "PARTS", "Codec", "Field", "Layout", "get_codec", "make_codec", "register_codec",
           "ExactCodec", "GearCodec", "GroupCodec", "ProjectedCodec", "RotationCodec", "PagedStore"]
