"""Tiny stand-ins for gradio and fastapi, used only when the real packages are not installed (the WebUI always has
both). They record what the extension builds so the tests can inspect it."""

from __future__ import annotations

import types


class Component:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.value = kwargs.get("value")
        self.visible = kwargs.get("visible", True)
        self.label = kwargs.get("label")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    gr.__stub__ = True
    for name in ("Textbox", "Radio", "Slider", "Checkbox", "Dropdown", "Number", "Button", "HTML", "Markdown",
                 "Accordion", "Blocks", "Row", "Column", "Group", "Tab", "TabItem", "Gallery", "Image", "JSON"):
        setattr(gr, name, type(name, (Component,), {}))
    gr.update = lambda **kwargs: {"__type__": "update", **kwargs}
    return gr


class HTTPException(Exception):
    def __init__(self, status_code, detail=None, headers=None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def make_fastapi() -> types.ModuleType:
    fastapi = types.ModuleType("fastapi")
    fastapi.__stub__ = True
    fastapi.HTTPException = HTTPException
    return fastapi


class FakeApp:
    """What an extension uses of the WebUI's FastAPI app: add_api_route (and the get/post decorators)."""

    def __init__(self):
        self.routes = {}  # (method, path) -> endpoint

    def add_api_route(self, path, endpoint, methods=None, **kwargs):
        for method in methods or ["GET"]:
            self.routes[(method.upper(), path)] = endpoint

    def get(self, path, **kwargs):
        return lambda f: self.add_api_route(path, f, methods=["GET"]) or f

    def post(self, path, **kwargs):
        return lambda f: self.add_api_route(path, f, methods=["POST"]) or f
