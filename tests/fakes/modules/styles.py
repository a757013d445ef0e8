"""modules.styles: the prompt style database and how a style's text joins a prompt (`{prompt}` is replaced by the
prompt; otherwise the style is appended after a comma), as in the WebUI v1.10.1."""

from dataclasses import dataclass


@dataclass
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str
    path: str = None


def merge_prompts(style_prompt, prompt):
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(p for p in (prompt.strip(), style_prompt.strip()) if p)


def apply_styles_to_prompt(prompt, styles):
    for style in styles:
        prompt = merge_prompts(style, prompt)
    return prompt


class StyleDatabase:
    def __init__(self, paths):
        self.no_style = PromptStyle("None", "", "", None)
        self.styles = {}
        self.paths = paths

    def apply_styles_to_prompt(self, prompt, styles):
        return apply_styles_to_prompt(prompt, [self.styles.get(x, self.no_style).prompt for x in styles])

    def apply_negative_styles_to_prompt(self, prompt, styles):
        return apply_styles_to_prompt(prompt, [self.styles.get(x, self.no_style).negative_prompt for x in styles])
