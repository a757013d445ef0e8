"""Where Block Merger runs: the `Host` protocol (`base`), the standalone app's host (`standalone`), the A1111 WebUI
host (`a1111`, the only module that imports the WebUI) and the axes it adds to the WebUI's X/Y/Z plot (`webui_xyz`)."""
