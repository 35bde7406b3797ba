"""tq-server: mlx_lm.server (OpenAI-compatible HTTP) on TurboQuant-compressed KV caches.

    tq-server                                 # bundled SmolLM2-135M-Instruct on 127.0.0.1:8080
    tq-server --model gemma3-270m --kv k4v3 --port 8000 --prompt-cache-bytes 2GB

Every mlx_lm.server flag works (its own main() runs, see `mlx_lm_hook`), plus --kv,
--kv-window and --kv-boundary-layers. What tq-server adds to mlx-lm's server:

- the prompt cache reuses a cached prefix only if it is at least as long as the tokens the
  cache's codecs were calibrated on, so that a hit answers as a cold server would, and keeps
  to --prompt-cache-bytes (mlx-lm applies it only when batching);
- bad requests get a 4xx with an OpenAI-style error body: mlx-lm's own checks, plus a model the
  server cannot serve (404), malformed messages or prompt (400), a prompt that does not fit the
  model's context (400, code context_length_exceeded);
- Ctrl-C stops it cleanly, also in the middle of an answer.

Requests are batched as mlx-lm batches them (its server decides from `merge`, which TurboQuant
caches have: `BatchTurboQuantKVCache`): concurrent requests decode together, each on its own
compressed cache; the batch's new caches are TurboQuant caches too (mlx-lm's BatchGenerator makes
them with `mlx_lm.generate.make_prompt_cache`, replaced while serving).  Presets whose caches do not
batch (trellis `-tcq`) are served one request at a time.
"""

import importlib
import io
import json
import logging
import os
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

import mlx.core as mx

from tq_mlx import TurboQuantKVCache
from tq_mlx.batch_cache import refusal

from . import distributed, mlx_lm_hook
from .bundled import BUNDLED, DEFAULT_MODEL

mlx_server = importlib.import_module("mlx_lm.server")
mlx_generate = importlib.import_module("mlx_lm.generate")
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 411: "invalid_request_error", 503: "server_error"}


class RequestError(ValueError):
    """A request the server refuses: HTTP status, message, and OpenAI's param and code."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status, message, param=None, code=None) -> bytes:
    """OpenAI's error object."""
    error = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}
    return json.dumps({"error": error}).encode()


class _OpenAIErrorBody:
    """Stands in for wfile after mlx-lm sent an error status: writes its body OpenAI's way."""

    def __init__(self, wfile, status, error):
        self._wfile, self._status, self._error = wfile, status, error

    def write(self, data: bytes):
        if isinstance(self._error, RequestError):
            e = self._error
            return self._wfile.write(error_body(e.status, str(e), e.param, e.code))
        try:
            message = json.loads(data)["error"]
        except (ValueError, TypeError, KeyError):
            message = data.decode("utf-8", "replace")
        return self._wfile.write(error_body(self._status, str(message)))

    def __getattr__(self, name):
        return getattr(self._wfile, name)


class ServerStopping(RuntimeError):
    """Ctrl-C arrived while a prompt was being prefilled: its answer ends here."""


class _Watched:
    """A request's response queue that tells the generator which answer is in progress."""

    def __init__(self, queue, generator):
        self._queue, self._generator = queue, generator

    def put(self, item):
        if isinstance(item, mlx_server.GenerationContext):
            self._generator.active = item
            if self._generator._stop:
                item.stop()
        elif isinstance(item, tuple) and self._generator._stop:  # prefill progress
            raise ServerStopping("tq-server is shutting down")
        self._queue.put(item)


class ResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's generation loop: a prompt that does not fit the model's context is refused, and
    stopping also stops the answer in progress (mlx-lm finishes it first)."""

    active = None
    _batchable = (None, False)  # (model key, whether its caches merge into batch caches)

    def _is_batchable(self, args):
        """mlx-lm's rule (caches with `merge`), and TurboQuant caches that batch (not trellis or chunked ones:
        those requests are served one at a time)."""
        provider = self.model_provider
        if provider.model is None:
            return super()._is_batchable(args)
        if self._batchable[0] != provider.model_key:
            caches = mlx_server.make_prompt_cache(provider.model)
            ok = not any(isinstance(c, TurboQuantKVCache) and refusal(c) for c in caches)
            self._batchable = (provider.model_key, ok)
        return self._batchable[1] and super()._is_batchable(args)

    def _serve_single(self, request, stream):
        rqueue, request, args = request
        try:
            super()._serve_single((_Watched(rqueue, self), request, args), stream)
        finally:
            self.active = None

    def stop_and_join(self):
        self._stop = True
        if self.active is not None:
            self.active.stop()
        super().stop_and_join()

    def _tokenize(self, tokenizer, request, args):
        out = super()._tokenize(tokenizer, request, args)
        limit = mlx_lm_hook.context_length(self.model_provider.model)
        if limit is not None and len(out[0]) >= limit:
            raise RequestError(
                400,
                f"This model's maximum context length is {limit} tokens; the prompt has {len(out[0])} "
                "tokens, leaving no room for an answer. Shorten the prompt.",
                "messages" if request.request_type == "chat" else "prompt",
                "context_length_exceeded",
            )
        return out


class APIHandler(mlx_server.APIHandler):
    """mlx-lm's handler with OpenAI-style 4xx errors and the request checks it lacks."""

    _error = None

    def served_model(self) -> str:
        return self.response_generator.cli_args.model or DEFAULT_MODEL

    # ---- errors -------------------------------------------------------------------
    def send_error_json(self, error: RequestError):
        body = error_body(error.status, str(error), error.param, error.code)
        self.send_response(error.status)
        self.send_header("Content-type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._set_cors_headers()
        self.end_headers()
        self.wfile.write(body)

    def _set_completion_headers(self, status_code: int = 200):
        if status_code >= 400:  # one of mlx-lm's error answers; inside its except clause, if any
            error = sys.exc_info()[1]
            if isinstance(error, RequestError):
                status_code = error.status
            elif error is not None and not self.response_generator.generation_available():
                status_code = 503  # mlx-lm says 404 when its generation thread has died
            self._error = (status_code, error)
        super()._set_completion_headers(status_code)

    def end_headers(self):
        super().end_headers()
        if self._error is not None:
            self.wfile = _OpenAIErrorBody(self.wfile, *self._error)
            self._error = None

    # ---- requests ---------------------------------------------------------------------
    def check_model(self, name):
        """The served model, or any other that tq_mlx.models.load opens locally (as mlx-lm would)."""
        if name in (None, "default_model", self.served_model()) or not isinstance(name, str):
            return  # mlx-lm's own check refuses a non-string
        path = Path(name).expanduser()
        if name in BUNDLED or (path.suffix.lower() == ".gguf" and path.is_file()) or (path / "config.json").is_file():
            return
        raise RequestError(
            404,
            f"The model '{name}' does not exist on this server: it serves '{self.served_model()}', and can "
            f"load a bundled model ({', '.join(sorted(BUNDLED))}), a local .gguf file or a local mlx-lm "
            "model directory.",
            "model",
            "model_not_found",
        )

    def check_request(self, body):
        """The checks mlx-lm lacks; JSON and parameter checks stay mlx-lm's."""
        if not isinstance(body, dict):
            return
        self.check_model(body.get("model"))
        if self.path == "/v1/completions":
            if not isinstance(body.get("prompt"), str):
                raise RequestError(400, "'prompt' must be a string", "prompt")
            return
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list of messages", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(400, f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
            if not isinstance(m.get("content"), (str, list, type(None))):
                raise RequestError(
                    400, f"messages[{i}].content must be a string, a list of parts or null", f"messages[{i}].content"
                )

    def do_POST(self):
        self._error = None
        try:
            length = int(self.headers.get("Content-Length"))
        except (TypeError, ValueError):
            length = None
        if self.path not in COMPLETION_PATHS or length is None:
            return super().do_POST()  # mlx-lm's 404, 411 or 400
        raw = self.rfile.read(length)
        try:
            self.check_request(json.loads(raw))
        except RequestError as e:
            return self.send_error_json(e)
        except ValueError:
            pass  # malformed JSON: mlx-lm's 400
        rfile, self.rfile = self.rfile, io.BytesIO(raw)  # mlx-lm reads the body again
        try:
            return super().do_POST()
        finally:
            self.rfile = rfile

    def handle_completion(self, request, stop_words):
        try:
            return super().handle_completion(request, stop_words)
        except ServerStopping:
            self.close_connection = True  # the answer is cut short: the client sees the stream end

    def do_GET(self):
        self._error = None
        return super().do_GET()

    def handle_models_request(self):
        """The served model (mlx-lm lists only Hugging Face cache entries and local paths)."""
        model = {"id": self.served_model(), "object": "model", "created": self.created, "owned_by": "tq-mlx"}
        if self.path.rstrip("/") not in ("/v1/models", f"/v1/models/{model['id']}"):
            return self.send_error_json(
                RequestError(
                    404, f"The model '{self.path[11:]}' does not exist on this server", "model", "model_not_found"
                )
            )
        body = json.dumps(
            {"object": "list", "data": [model]} if self.path.rstrip("/") == "/v1/models" else model
        ).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


_started = False  # run() began: mlx-lm's generation thread exists


def run(host, port, model_provider, server_class=ThreadingHTTPServer, handler_class=APIHandler):
    """mlx_lm.server.run with tq-server's handler, generator and prompt cache; Ctrl-C stops it."""
    global _started
    _started = True
    args = model_provider.cli_args
    prompt_cache = mlx_server.LRUPromptCache(args.prompt_cache_size, args.prompt_cache_bytes)
    saved, mlx_generate.make_prompt_cache = mlx_generate.make_prompt_cache, mlx_server.make_prompt_cache
    generator = ResponseGenerator(model_provider, prompt_cache)  # BatchGenerator's new caches: TurboQuant
    try:
        if mx.distributed.init().rank() == 0:
            mlx_server._run_http_server(host, port, generator, server_class, handler_class)
        else:
            generator.join()
    finally:
        generator.stop_and_join()
        mlx_generate.make_prompt_cache = saved


def _exit(status: int):
    """Leave without the interpreter's teardown, where MLX 0.32 can abort ("terminate called
    without an active exception") destroying what mlx-lm's generation thread used; the server
    has stopped and nothing is left to save."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv=None) -> int:
    """Run mlx_lm.server's main() with TurboQuant caches; argv defaults to sys.argv[1:].
    Once the server has run, the process ends here: 0, 130 for a Ctrl-C outside serving, 1 for an
    error such as a port in use.  Under mlx.launch (a group of several processes) it refuses to start:
    mlx_lm.server's own tensor parallelism shares its batches between ranks, which TurboQuant caches
    (served one request at a time) do not take part in yet."""
    if distributed.launched() and distributed.world().size() > 1:
        print(
            "tq-server: tensor parallelism (mlx.launch) is not supported by tq-server yet; run tq-generate or "
            "tq-chat under mlx.launch, or tq-server as one process",
            file=sys.stderr,
        )
        return 1
    try:
        with mlx_lm_hook.installed(
            mlx_server, prog="tq-server", argv=argv, defaults={"model": DEFAULT_MODEL}, extra={"run": run}
        ):
            mlx_server.main()
    except KeyboardInterrupt:
        _exit(130)
    except (mlx_lm_hook.UnsupportedMlxLmError, OSError, ValueError) as e:
        print(f"tq-server: {e}", file=sys.stderr)
        if _started:
            _exit(1)
        return 1
    _exit(0)


if __name__ == "__main__":
    sys.exit(main())
