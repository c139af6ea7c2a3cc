"""`caption-serve`: a local web app that captions uploaded images, with a JSON API.

    caption-serve checkpoint=outputs/demo/checkpoints/best.pt        # http://127.0.0.1:8000/

`GET /` is one page: drop or choose an image, pick the beam size, and read the caption with
the attention view of the HTML report (the same script, `caption/views/web/attention.js`).
`POST /caption` takes the image as the multipart field `image` (and optionally `beam_size`)
and answers the caption, its words, and per word the gate β and the attention map; the
OpenAPI schema at `/openapi.json` documents it. Bad requests get a 4xx status and
`{"error": "<what is wrong; what to do>"}`; a request body over `max_upload_mb` or an image
over `max_pixels` is refused before it is decoded. Requests are served from a thread pool and
decode one at a time on the model, so concurrent requests queue rather than collide.

Nothing is loaded from the network: the page embeds its script and styles, and the
interactive API docs (which fetch Swagger UI from a CDN) are switched off.
"""

import io
import logging
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from caption.config import check_bool, check_choice, check_float, check_int, resolve_device
from caption.errors import CaptionError
from caption.models.build import load_captioner
from caption.overrides import hydra_command
from caption.runtime import configure_cpu
from caption.views.attention import attention_views
from caption.views.report import attention_record, render_page

try:  # the optional `web` extra
    import uvicorn
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise CaptionError(
        f"caption-serve needs the web extra ({e.name} is missing); "
        "install it with pip install -e '.[web]'"
    ) from None

log = logging.getLogger(__name__)


class Window(BaseModel):
    cells: list[int] = Field(description="[row0, row1, col0, col1] of the window, inclusive")
    centre: list[float] = Field(description="p_t as [row, col] in cell units")


class CaptionResponse(BaseModel):
    caption: str = Field(description="the caption, words joined by spaces")
    words: list[str] = Field(description="the caption's words, <end> excluded")
    attention: list[list[float]] = Field(
        description="per word, its attention α over the H'×W' grid, row-major (sums to 1)"
    )
    betas: list[float] = Field(description="per word, the gate β that scaled its context")
    grid: list[int] = Field(description="[H', W'], the attention grid laid over the image")
    vmax: float | list[float] = Field(description="the top of the colour scale the page uses")
    locations: list[int] | None = Field(
        description="hard attention: the sampled cell per word (row-major); else null"
    )
    windows: list[list[Window | None]] | None = Field(
        description="local attention: per word, the window of each head (one without heads); "
        "else null"
    )
    log_prob: float = Field(description="log p(caption | image)")
    beam_size: int
    width: int = Field(description="the uploaded image's width in pixels")
    height: int = Field(description="the uploaded image's height in pixels")
    time_ms: float = Field(description="time spent on the server for this request")


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong with the request, and what to do")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "the upload is empty, not an image, or corrupt",
        413: "the request body is over max_upload_mb, or the image over max_pixels",
        422: "a field is missing or invalid (image, beam_size)",
    }.items()
}


class UploadLimit:
    """Refuse request bodies over `max_bytes` with 413 before they reach the app.

    The body is read here, counted and passed on whole; one over the limit is drained and
    dropped, never held, so a huge upload costs no memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        over = declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            over = over or size > self.max_bytes
            if over:
                chunks.clear()
            else:
                chunks.append(message.get("body", b""))
        if over:  # answered only now: a client still sending would not read it
            limit = f"{self.max_bytes / 2**20:g} MB"
            response = JSONResponse(
                {
                    "error": f"request: the upload is over this server's limit of {limit} "
                    "(max_upload_mb); send a smaller image"
                },
                status_code=413,
            )
            await response(scope, receive, send)
            return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def read_upload(
    data: bytes, max_pixels: int, prepare: Callable[[Image.Image], torch.Tensor]
) -> tuple[torch.Tensor, int, int]:
    """Check and decode an uploaded image, made the model's input by `prepare`
    (`Captioner.prepare`).

    Returns:
        The model's input (3, S, S) uint8, and the image's width and height.

    Raises:
        HTTPException: 400 for an empty, unknown or corrupt file, 413 over `max_pixels`.
    """
    if not data:
        raise HTTPException(400, "image: the upload is empty; send an image file")
    try:
        with warnings.catch_warnings():  # the pixel limit below is ours to enforce
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise HTTPException(
            413,
            f"image: far over this server's limit of {max_pixels:,} pixels (max_pixels); "
            "send a smaller image",
        ) from None
    except UnidentifiedImageError:
        raise HTTPException(
            400,
            "image: not an image file (PIL cannot identify it); send a PNG, JPEG or "
            "another common image format",
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise HTTPException(
            400, f"image: corrupt image header ({e}); send an intact image"
        ) from None
    width, height = im.size
    if width * height > max_pixels:
        raise HTTPException(
            413,
            f"image: {width}×{height} is {width * height:,} pixels, over this server's limit of "
            f"{max_pixels:,} (max_pixels); send a smaller image",
        )
    try:
        return prepare(im), width, height
    except (OSError, SyntaxError, ValueError) as e:
        raise HTTPException(
            400, f"image: corrupt or truncated image ({e}); send an intact image file"
        ) from None


def check_serve_config(cfg: DictConfig) -> None:
    """The values `caption-serve` needs, each checked with a one-line error."""
    check_int(cfg, "port", 1)
    if cfg.port > 65535:
        raise CaptionError(f"port: {cfg.port} is not a TCP port; pass port=<1..65535>")
    check_int(cfg, "max_beam_size", 1)
    check_int(cfg, "beam_size", 1)
    if cfg.beam_size > cfg.max_beam_size:
        raise CaptionError(
            f"beam_size: {cfg.beam_size} is over max_beam_size={cfg.max_beam_size}; "
            "lower it or raise max_beam_size"
        )
    check_int(cfg, "max_len", 1)
    check_bool(cfg, "allow_unk")
    check_float(cfg, "length_penalty", 0.0)
    check_bool(cfg, "block_trigrams")
    check_int(cfg, "max_pixels", 1)
    check_float(cfg, "max_upload_mb", 0.001)
    check_choice(cfg, "normalize", ("shared", "panel"))


def create_app(cfg: DictConfig) -> FastAPI:
    """Load `cfg.checkpoint` and build the app (see conf/serve.yaml for the keys)."""
    check_serve_config(cfg)
    device = resolve_device(cfg.device)
    configure_cpu()
    model, vocab, _ = load_captioner(cfg.checkpoint, device)
    image_size = model.image_size
    lock = threading.Lock()  # one decode at a time: the model is shared by the thread pool
    name = Path(cfg.checkpoint).name
    page = render_page(
        "app.html",
        title=name,
        subtitle=f"{cfg.checkpoint} · {image_size} px input · runs on this machine only",
        data={"beam_size": cfg.beam_size, "max_beam_size": cfg.max_beam_size},
    )

    app = FastAPI(
        title="caption",
        summary="Caption images and see where the model looked for each word",
        version="1",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: the app stays offline
        redoc_url=None,
    )
    _errors_as_json(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health", summary="Is the server up, and with which model")
    def health() -> dict[str, Any]:
        return {"status": "ok", "checkpoint": str(cfg.checkpoint), "image_size": image_size}

    @app.post(
        "/caption",
        response_model=CaptionResponse,
        responses=ERRORS,
        summary="Caption one image",
        description="The image goes in the multipart field `image`. The caption comes back "
        "with, per word, its attention over the encoder grid and its gate β.",
    )
    def caption(
        image: Annotated[UploadFile, File(description="the image: PNG, JPEG, ...")],
        beam_size: Annotated[
            int, Form(ge=1, le=cfg.max_beam_size, description="beams of the search")
        ] = cfg.beam_size,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        x, width, height = read_upload(image.file.read(), cfg.max_pixels, model.prepare)
        with lock, torch.inference_mode():
            gen = model.generate(
                x[None].to(device),
                strategy="beam",
                beam_size=beam_size,
                max_len=cfg.max_len,
                allow_unk=cfg.allow_unk,
                length_penalty=cfg.length_penalty,
                block_trigrams=cfg.block_trigrams,
            )
        view = attention_views(model, vocab, gen)[0]
        return {
            **attention_record(view, normalize=cfg.normalize),
            "log_prob": round(view.log_prob, 4),
            "beam_size": beam_size,
            "width": width,
            "height": height,
            "time_ms": round(1000 * (time.perf_counter() - start), 2),
        }

    app.add_middleware(UploadLimit, max_bytes=int(cfg.max_upload_mb * 2**20))
    return app


def _errors_as_json(app: FastAPI) -> None:
    """Answer HTTP errors and invalid requests as `{"error": "<what is wrong; what to do>"}`."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}"
            for e in exc.errors()
        ]
        hint = "send the image as multipart field 'image', optionally 'beam_size' (/openapi.json)"
        return JSONResponse({"error": f"{'; '.join(problems)}; {hint}"}, status_code=422)


def check_port(host: str, port: int) -> None:
    """Fail with one line when the address is taken, before uvicorn logs a traceback."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise CaptionError(
            f"port: cannot listen on {host}:{port} ({e.strerror}); pass another port= or host="
        ) from None


@hydra_command("caption-serve", "serve")
def main(cfg: DictConfig) -> None:
    app = create_app(cfg)
    check_port(cfg.host, cfg.port)
    print(
        f"caption-serve: http://{cfg.host}:{cfg.port}/ (API schema: /openapi.json); "
        "Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log
    )


if __name__ == "__main__":
    main()
