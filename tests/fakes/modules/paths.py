"""Where the fake WebUI lives; tests point these at tmp_path."""

import os

script_path = os.getcwd()
data_path = script_path
models_path = os.path.join(data_path, "models")
