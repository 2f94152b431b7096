"""Request bodies -> checked 8-bit RGB images, or an `UploadError` (HTTP status + one-line message).

Accepted bodies: `multipart/form-data` with one or more files (any field name), or the raw bytes of one image
with an `image/*` (or `application/octet-stream`) content type. Every image is decoded completely here, in
the request's thread, so a broken upload is refused before it reaches a batch:
    415  a content type that is neither            413  a body, an image (width x height) or a count too large
    400  an empty body or file, a broken form      422  bytes that are not an image, or a truncated image
`read_uploads` reads a request's body with these limits; `decode` checks one image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..data.transforms import to_rgb8
from ..errors import MoleflowError

if TYPE_CHECKING:
    from .settings import ServeSettings

RAW_TYPES = ("application/octet-stream",)


class UploadError(Exception):
    """A request the service refuses: `status` (4xx) and a one-line message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Upload:
    """One uploaded file before decoding."""

    name: str
    data: bytes


@dataclass
class Decoded:
    """One decoded image: 8-bit RGB, with its upload name and original size."""

    name: str
    image: Image.Image
    width: int
    height: int


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def is_raw_image_type(content_type: str | None) -> bool:
    kind = media_type(content_type)
    return kind.startswith("image/") or kind in RAW_TYPES


def check_content_type(content_type: str | None) -> str:
    """"multipart" or "raw"; anything else is a 415."""
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        return "multipart"
    if is_raw_image_type(kind):
        return "raw"
    raise UploadError(415, f"content type {kind or '(none)'!r} is not accepted; send multipart/form-data with "
                           "image files, or the raw bytes of one image with an image/* content type")


def check_count(n: int, limit: int) -> None:
    if n == 0:
        raise UploadError(400, "the request holds no image; send one or more image files")
    if n > limit:
        raise UploadError(413, f"{n} images in one request; at most {limit} are accepted (--max-images); "
                               "split the request")


def decode(upload: Upload, max_pixels: int) -> Decoded:
    """Decode one upload completely (not only its header) to 8-bit RGB, within `max_pixels`."""
    name = upload.name or "image"
    if not upload.data:
        raise UploadError(400, f"{name}: empty file; send the image's bytes")
    try:
        with Image.open(io.BytesIO(upload.data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise UploadError(413, f"{name}: {width} x {height} pixels is more than the {max_pixels:,} accepted "
                                       "(--max-pixels); send a smaller image")
            img.load()
            rgb = to_rgb8(img, name)
            rgb.load()
    except UploadError:
        raise
    except MoleflowError as exc:
        raise UploadError(422, str(exc)) from None
    except UnidentifiedImageError:
        raise UploadError(422, f"{name}: not an image (PNG, JPEG, TIFF, BMP ... expected); "
                               f"{len(upload.data)} bytes starting {upload.data[:8]!r}") from None
    except Image.DecompressionBombError:
        raise UploadError(413, f"{name}: too many pixels for the image decoder; send a smaller image") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise UploadError(422, f"{name}: cannot decode this image ({detail}); the file is truncated or "
                               "damaged") from None
    return Decoded(name=name, image=rgb, width=width, height=height)


async def read_uploads(request: Request, settings: "ServeSettings") -> list[Upload]:
    """The files of a multipart body, or the one image of a raw body; limits checked (UploadError)."""
    kind = check_content_type(request.headers.get("content-type"))
    limit = settings.max_body_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise UploadError(413, f"request body of {int(length):,} bytes is larger than the {limit:,} accepted "
                               "(--max-body-mb)")
    if kind == "raw":
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise UploadError(413, f"request body larger than the {limit:,} bytes accepted (--max-body-mb)")
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            raise UploadError(400, "empty request body; send the bytes of an image")
        name = request.headers.get("x-filename") or "image"
        return [Upload(name, data)]
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images + 16)
    except HTTPException as exc:
        detail = str(exc.detail)
        if "Too many files" in detail:
            raise UploadError(413, f"more than {settings.max_images} images in one request (--max-images); "
                                   "split the request") from None
        raise UploadError(400, f"cannot read the multipart form ({detail})") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        check_count(len(files), settings.max_images)
        uploads = []
        for i, f in enumerate(files):
            uploads.append(Upload(f.filename or f"image{i}", await f.read()))
        return uploads
    finally:
        await form.close()
