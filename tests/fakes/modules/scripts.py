"""modules.scripts: the Script base class, AlwaysVisible, the loader (`load_scripts` steps 1-5 of the integration
reference §1.3: extension root prepended to sys.path only while the file executes, module named "<file>.py" and not
put in sys.modules, every Script subclass in its namespace registered) and a ScriptRunner for txt2img."""

import os
import sys
from collections import namedtuple
from importlib import util

from modules import paths


class AlwaysVisibleClass:
    pass


AlwaysVisible = AlwaysVisibleClass()

ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
loaded_scripts = {}
current_basedir = paths.script_path


def basedir():
    return current_basedir


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        title = self.title().lower().replace(" ", "_")
        tab = "img2img" if self.is_img2img else "txt2img"
        return f"script_{tab}_{title}_{item_id}"


def load_module(path):
    module_spec = util.spec_from_file_location(os.path.basename(path), path)
    module = util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module


def load_scripts(files):
    """`files`: [(scriptfile path, basedir = extension root)], in load order."""
    global current_basedir
    syspath = sys.path
    for path, base in files:
        try:
            if base != paths.script_path:
                sys.path = [base] + sys.path
            current_basedir = base
            module = load_module(path)
            for _, script_class in module.__dict__.items():
                if isinstance(script_class, type) and issubclass(script_class, Script):
                    scripts_data.append(ScriptClassData(script_class, path, base, module))
        finally:
            sys.path = syspath
            current_basedir = paths.script_path


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.alwayson_scripts = []
        self.selectable_scripts = []
        self.inputs = [None]
        self.reported = []  # exceptions the real runner would print with errors.report

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            visibility = script.show(is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def setup_ui(self):
        for script in self.alwayson_scripts:
            controls = script.ui(script.is_img2img) or []
            script.args_from = len(self.inputs)
            self.inputs += list(controls)
            script.args_to = len(self.inputs)

    def _run(self, name, p, *extra):
        """As the real runner: an always-on script's exception is reported on the console and the generation goes
        on (v1.10.1 `ScriptRunner.before_process` etc. catch `Exception` around each script)."""
        for script in self.alwayson_scripts:
            args = p.script_args[script.args_from:script.args_to]
            try:
                getattr(script, name)(p, *extra, *args)
            except Exception as e:  # noqa: BLE001 - the WebUI's errors.report
                self.reported.append(e)
                print(f"*** Error running {name}: {script.filename}: {type(e).__name__}: {e}", file=sys.stderr)

    def before_process(self, p):
        self._run("before_process", p)

    def process(self, p):
        self._run("process", p)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)


scripts_txt2img = ScriptRunner()
