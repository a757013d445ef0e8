"""The Block Merger tab (gradio 3.41 and 4): its controls (`tab`), value parsing (`values`), the weight chart
(`chart`), the tab's X/Y/Z plot runner (`plot`) and the standalone app that serves it without the WebUI (`app`)."""
