"""Fakes for the tests: a faithful fake of the WebUI's `modules` package and tiny gradio/fastapi stand-ins."""
