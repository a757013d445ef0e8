"""modules.sd_hijack: wraps the text encoder(s) as the real hijack does, which renames their state-dict keys
(`cond_stage_model.wrapped.…token_embedding.wrapped.weight`). A checkpoint-keyed `load_state_dict` without
`undo_hijack` first therefore silently skips the text encoder, exactly as in the WebUI."""

import torch


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, embeddings=None):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    def __init__(self, wrapped, hijack=None):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack


_TOKEN_PATHS = ("transformer.text_model.embeddings", "model")


def _embeddings_owner(encoder):
    for path in _TOKEN_PATHS:
        try:
            owner = encoder.get_submodule(path)
        except AttributeError:
            continue
        if "token_embedding" in owner._modules:
            return owner
    return None


class StableDiffusionModelHijack:
    def __init__(self):
        self.hijacks = 0
        self.undos = 0

    def _slots(self, m):
        if "cond_stage_model" in m._modules:
            return [(m, "cond_stage_model")]
        if "conditioner" in m._modules:
            embedders = m.conditioner.embedders
            return [(embedders, name) for name in list(embedders._modules)]
        return []

    def hijack(self, m):
        self.hijacks += 1
        for parent, name in self._slots(m):
            encoder = parent._modules[name]
            if isinstance(encoder, FrozenCLIPEmbedderWithCustomWords):
                continue
            owner = _embeddings_owner(encoder)
            if owner is not None:
                owner.token_embedding = EmbeddingsWithFixes(owner.token_embedding, self)
            setattr(parent, name, FrozenCLIPEmbedderWithCustomWords(encoder, self))

    def undo_hijack(self, m):
        self.undos += 1
        for parent, name in self._slots(m):
            wrapper = parent._modules[name]
            if not isinstance(wrapper, FrozenCLIPEmbedderWithCustomWords):
                continue
            encoder = wrapper.wrapped
            owner = _embeddings_owner(encoder)
            if owner is not None and isinstance(owner.token_embedding, EmbeddingsWithFixes):
                owner.token_embedding = owner.token_embedding.wrapped
            setattr(parent, name, encoder)

    def is_hijacked(self, m):
        return any(isinstance(p._modules[n], FrozenCLIPEmbedderWithCustomWords) for p, n in self._slots(m))


model_hijack = StableDiffusionModelHijack()
