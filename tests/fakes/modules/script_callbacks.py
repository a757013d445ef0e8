"""modules.script_callbacks: callback registries the tests can inspect, and the runners the WebUI calls."""

import dataclasses
import os
import sys


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: object
    name: str = None


callback_map = {name: [] for name in (
    "callbacks_app_started", "callbacks_model_loaded", "callbacks_ui_tabs", "callbacks_ui_train_tabs",
    "callbacks_ui_settings", "callbacks_before_ui", "callbacks_script_unloaded", "callbacks_infotext_pasted",
    "callbacks_before_reload", "callbacks_after_component")}


def _add(kind, callback, name=None):
    caller = sys._getframe(2).f_code.co_filename  # the registering script (inspect.stack() is slow)
    callback_map[kind].append(ScriptCallback(os.path.basename(caller), callback, name))


def clear_callbacks():
    for items in callback_map.values():
        items.clear()


def on_app_started(callback, *, name=None):
    _add("callbacks_app_started", callback, name)


def on_model_loaded(callback, *, name=None):
    _add("callbacks_model_loaded", callback, name)


def on_ui_tabs(callback, *, name=None):
    _add("callbacks_ui_tabs", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("callbacks_ui_settings", callback, name)


def on_before_ui(callback, *, name=None):
    _add("callbacks_before_ui", callback, name)


def on_script_unloaded(callback, *, name=None):
    _add("callbacks_script_unloaded", callback, name)


def on_infotext_pasted(callback, *, name=None):
    _add("callbacks_infotext_pasted", callback, name)


def app_started_callback(demo, app):
    for c in callback_map["callbacks_app_started"]:
        c.callback(demo, app)


def model_loaded_callback(sd_model):
    for c in callback_map["callbacks_model_loaded"]:
        c.callback(sd_model)


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c.callback() or []
    return res


def ui_settings_callback():
    for c in callback_map["callbacks_ui_settings"]:
        c.callback()


def before_ui_callback():
    for c in callback_map["callbacks_before_ui"]:
        c.callback()


def script_unloaded_callback():
    for c in callback_map["callbacks_script_unloaded"]:
        c.callback()
