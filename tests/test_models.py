"""models.py: the three families behind LogitModel, loading, truncation, fingerprints — on tiny random models."""

from pathlib import Path

import pytest
import torch

from sinkd_ray.errors import SinkdError
from sinkd_ray.models import (
    META_FILE,
    LogitModel,
    answer_positions,
    count_parameters,
    detect_family,
    label_token_ids,
    load_config,
    load_student,
    load_teacher,
    model_fingerprint,
    offline_minilm_path,
    transformer_layers,
    truncate_layers,
)
from sinkd_ray.tasks import get_task

COLA, RTE, MNLI = get_task("cola"), get_task("rte"), get_task("mnli")
PROMPTS = [
    "Sentence: the dog is good\nIs this sentence grammatically correct? Answer:",
    "Sentence: a cat was here and there was a man with his book\nIs this sentence grammatically correct? Answer:",
    "Sentence: who does it\nIs this sentence grammatically correct? Answer:",
]
FAMILY_DIRS = {"encoder": "tiny_bert_dir", "encoder-decoder": "tiny_t5_dir", "decoder": "tiny_gptneo_dir"}


def batch(model: LogitModel, texts=PROMPTS, side: str = "right") -> dict:
    model.tokenizer.padding_side = side
    return dict(model.tokenizer(texts, padding=True, return_tensors="pt"))


def logits(model: LogitModel, enc: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"])


@pytest.fixture(scope="module")
def bert_teacher_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a (random, seeded) CoLA head saved in: a 'fine-tuned' teacher for head-dependent tests."""
    torch.manual_seed(1)
    return load_student(tiny_bert_dir, COLA).save_pretrained(tmp_path_factory.mktemp("bert-cola"))


# ------------------------------------------------------------------------------------------------- families
def test_detect_family_from_configs():
    from transformers import BertConfig, GPT2Config, GPTNeoConfig, LlamaConfig, MPNetConfig, T5Config

    assert detect_family(BertConfig()) == detect_family(MPNetConfig()) == "encoder"
    assert detect_family(T5Config()) == "encoder-decoder"
    assert detect_family(GPTNeoConfig()) == detect_family(GPT2Config()) == detect_family(LlamaConfig()) == "decoder"
    assert detect_family(BertConfig(), "decoder") == "decoder"  # explicit wins
    with pytest.raises(SinkdError, match="family 'seq2seq' is unknown"):
        detect_family(BertConfig(), "seq2seq")


def test_detect_family_unknown_model_type_names_the_fix():
    from transformers import PretrainedConfig

    with pytest.raises(SinkdError, match="pass family="):
        detect_family(PretrainedConfig(architectures=["MysteryModel"]))


@pytest.mark.parametrize("family", FAMILY_DIRS)
def test_teacher_label_logits_shape_frozen_and_eval(family, request):
    teacher = load_teacher(request.getfixturevalue(FAMILY_DIRS[family]), COLA)
    assert teacher.family == family and teacher.logit_space == "label"
    out = logits(teacher, batch(teacher))
    assert out.shape == (3, COLA.num_labels) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert teacher.output_dim == COLA.num_labels
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not any(m.training for m in teacher.modules())
    torch.nn.ModuleList([teacher]).train()  # a parent switching to training leaves the frozen teacher in eval
    assert not any(m.training for m in teacher.modules())
    assert count_parameters(teacher, trainable_only=True) == 0 < count_parameters(teacher)


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder"])
def test_vocab_logits_shape(family, request):
    teacher = load_teacher(request.getfixturevalue(FAMILY_DIRS[family]), RTE, logit_space="vocab")
    vocab = teacher.hf_model.get_output_embeddings().weight.shape[0]
    assert logits(teacher, batch(teacher)).shape == (3, vocab) == (3, teacher.output_dim)


@pytest.mark.parametrize("family", FAMILY_DIRS)
def test_student_logits_carry_gradients(family, request):
    student = load_student(request.getfixturevalue(FAMILY_DIRS[family]), COLA)
    enc = batch(student)
    torch.nn.functional.cross_entropy(
        student(enc["input_ids"], enc["attention_mask"]), torch.tensor([0, 1, 1])
    ).backward()
    embeddings = student.hf_model.get_input_embeddings().weight
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_encoder_has_no_vocab_space(tiny_bert_dir):
    with pytest.raises(SinkdError, match="logit_space='vocab' needs a generative model"):
        load_teacher(tiny_bert_dir, COLA, logit_space="vocab")


def test_encoder_classification_head_uses_task_labels(tiny_bert_dir):
    student = load_student(tiny_bert_dir, MNLI)
    assert student.hf_model.config.id2label == dict(enumerate(MNLI.label_names))
    assert student.training and count_parameters(student, trainable_only=True) == count_parameters(student)
    enc = batch(student, ["the dog is good", "a cat"])
    with_types = student(enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"])
    assert with_types.shape == (2, 3)


def test_head_with_other_class_count_is_refused(bert_teacher_dir):
    with pytest.raises(SinkdError, match="has a 2-class head but task 'mnli' has 3 classes"):
        load_teacher(bert_teacher_dir, MNLI)


# --------------------------------------------------------------------------------------- generative families
def test_label_token_ids_are_the_first_answer_tokens(tiny_gptneo_dir, tiny_t5_dir):
    teacher = load_teacher(tiny_gptneo_dir, RTE)
    tokenizer = teacher.tokenizer
    assert teacher.label_token_ids.tolist() == tokenizer.convert_tokens_to_ids(["yes", "no"])
    assert label_token_ids(tokenizer, ("maybe", "no"), "encoder-decoder") == tokenizer.convert_tokens_to_ids(
        ["maybe", "no"]
    )
    # a word outside the vocab is read at its first sub-token: 'yesterday' → 'yes' '##t' … collides with 'yes'
    with pytest.raises(SinkdError, match="label words 'yes' and 'yesterday' both start with token 'yes'"):
        label_token_ids(tokenizer, ("yes", "yesterday"), "decoder")


def test_answer_positions_for_both_padding_sides():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert answer_positions(mask).tolist() == [2, 4, 4]


@pytest.mark.parametrize("per_row_head", [True, False], ids=["lm-head-at-answer-only", "full-lm-head"])
def test_decoder_left_and_right_padding_match_unpadded(tiny_gptneo_dir, per_row_head):
    teacher = load_teacher(tiny_gptneo_dir, COLA, logit_space="vocab")
    teacher._per_row_logits_to_keep = per_row_head and teacher._per_row_logits_to_keep
    single = torch.cat([logits(teacher, batch(teacher, [text])) for text in PROMPTS])
    left, right = logits(teacher, batch(teacher, side="left")), logits(teacher, batch(teacher, side="right"))
    assert batch(teacher, side="left")["attention_mask"][:, 0].tolist() == [0, 1, 0]  # really padded
    torch.testing.assert_close(left, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, single, atol=1e-5, rtol=1e-5)
    labels = load_teacher(tiny_gptneo_dir, COLA)
    torch.testing.assert_close(logits(labels, batch(labels, side="left")), single[:, labels.label_token_ids])


def test_encoder_decoder_label_logits_are_entries_of_vocab_logits(tiny_t5_dir):
    label_model, vocab_model = load_teacher(tiny_t5_dir, RTE), load_teacher(tiny_t5_dir, RTE, logit_space="vocab")
    enc = batch(label_model)
    vocab = logits(vocab_model, enc)
    torch.testing.assert_close(logits(label_model, enc), vocab[:, label_model.label_token_ids], rtol=0, atol=0)
    torch.testing.assert_close(label_model.label_logits(vocab), vocab[:, label_model.label_token_ids])
    torch.testing.assert_close(vocab_model.class_logits(vocab), logits(label_model, enc))  # vocab → classes
    label_out = logits(label_model, enc)
    assert label_model.class_logits(label_out) is label_out  # label space: already class logits
    # the decoder read only its start token: one decoder step equals a manual forward with decoder_input_ids=[[0]]
    start = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        manual = vocab_model.hf_model(**enc, decoder_input_ids=start).logits[:, 0]
    torch.testing.assert_close(vocab, manual)


def test_generative_label_space_needs_a_verbalizer(tiny_gptneo_dir):
    from dataclasses import replace

    with pytest.raises(SinkdError, match="needs the task's verbalizer"):
        load_teacher(tiny_gptneo_dir, replace(COLA, verbalizer=(), label_names=()))


# ------------------------------------------------------------------------------------------------ truncation
def _stack(model: LogitModel, path: str):
    return model.hf_model.base_model.get_submodule(path)


@pytest.mark.parametrize(
    "family, stacks, config_fields",
    [
        ("encoder", ["encoder.layer"], ["num_hidden_layers"]),
        ("encoder-decoder", ["encoder.block", "decoder.block"], ["num_layers", "num_decoder_layers"]),
        ("decoder", ["h"], ["num_layers"]),
    ],
)
def test_student_keeps_first_k_layers_and_reloads(family, stacks, config_fields, request, tmp_path):
    path = request.getfixturevalue(FAMILY_DIRS[family])
    torch.manual_seed(0)
    full = load_student(path, COLA)
    torch.manual_seed(0)  # same seed → same new encoder head, so the two students share every kept tensor
    student = load_student(path, COLA, num_layers=2)
    for stack in stacks:
        assert len(_stack(student, stack)) == 2 < len(_stack(full, stack))
        for kept, original in zip(_stack(student, stack), _stack(full, stack)):
            for (name, a), (_, b) in zip(kept.state_dict().items(), original.state_dict().items()):
                assert torch.equal(a, b), name
    full_state = full.hf_model.state_dict()
    for name, tensor in student.hf_model.state_dict().items():
        assert torch.equal(tensor, full_state[name]), name  # every kept tensor (embeddings, norms, head) identical
    assert all(getattr(student.hf_model.config, f) == 2 for f in config_fields)
    assert student.transformer_layers() == [layer for s in stacks for layer in _stack(student, s)]

    student.save_pretrained(tmp_path / "student")
    reloaded = load_student(tmp_path / "student", COLA)
    assert reloaded.family == family and all(getattr(reloaded.hf_model.config, f) == 2 for f in config_fields)
    student.eval(), reloaded.eval()
    enc = batch(student)
    torch.testing.assert_close(logits(reloaded, enc), logits(student, enc), rtol=0, atol=0)


def _tiny_configs():
    from transformers import DistilBertConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MPNetConfig, Qwen2Config

    small = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
    }
    return {
        "gpt2": GPT2Config(vocab_size=64, n_embd=16, n_head=2, n_layer=3, n_positions=32),
        "llama": LlamaConfig(**small, num_key_value_heads=2, max_position_embeddings=32),
        "qwen2": Qwen2Config(**small, num_key_value_heads=2, max_position_embeddings=32),
        "gpt_neox": GPTNeoXConfig(**small, max_position_embeddings=32),
        "mpnet": MPNetConfig(**small, max_position_embeddings=40),
        "distilbert": DistilBertConfig(vocab_size=64, dim=16, n_heads=2, hidden_dim=32, n_layers=3),
    }


@pytest.mark.parametrize("model_type", list(_tiny_configs()))
def test_truncate_other_architectures_reloads_with_from_pretrained(model_type, tmp_path):
    from transformers import AutoModel

    config = _tiny_configs()[model_type]
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    truncate_layers(model, 2)
    assert len(transformer_layers(model)) == 2
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, torch.nn.ModuleList) and len(m) == 2 for m in reloaded.modules()) >= 1
    ids = torch.randint(4, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_truncation_errors(tiny_gptneo_dir):
    from transformers import AlbertConfig, AlbertModel

    with pytest.raises(SinkdError, match="num_layers=9 but 'h' has only 4 layers"):
        load_student(tiny_gptneo_dir, COLA, num_layers=9)
    with pytest.raises(SinkdError, match="num_layers=0 is invalid"):
        load_student(tiny_gptneo_dir, COLA, num_layers=0)
    albert = AlbertModel(
        AlbertConfig(
            vocab_size=32,
            embedding_size=8,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=16,
            num_hidden_layers=2,
        )
    )
    with pytest.raises(SinkdError, match="cannot truncate model_type 'albert'"):
        truncate_layers(albert, 1)


def test_saved_student_reloads_in_its_logit_space(tiny_gptneo_dir, tmp_path):
    student = load_student(tiny_gptneo_dir, RTE, logit_space="vocab", num_layers=3)
    student.save_pretrained(tmp_path)
    assert (tmp_path / META_FILE).is_file() and (tmp_path / "model.safetensors").is_file()
    reloaded = load_student(tmp_path, RTE)
    assert (reloaded.family, reloaded.logit_space) == ("decoder", "vocab")
    assert reloaded.label_token_ids.tolist() == student.label_token_ids.tolist()
    assert load_student(tmp_path, RTE, logit_space="label").output_dim == 2


# ----------------------------------------------------------------------------------------------- bookkeeping
def test_fingerprint_changes_with_weights(bert_teacher_dir, tmp_path):
    model = load_teacher(bert_teacher_dir, COLA)
    assert model_fingerprint(bert_teacher_dir) == model_fingerprint(str(bert_teacher_dir))  # stable
    before = model_fingerprint(model)
    assert model_fingerprint(load_teacher(bert_teacher_dir, COLA)) == before  # same weights, same digest
    with torch.no_grad():
        model.hf_model.classifier.bias[0] += 1e-3
    assert model_fingerprint(model) != before
    model.save_pretrained(tmp_path)
    assert model_fingerprint(tmp_path) != model_fingerprint(bert_teacher_dir)


def test_missing_path_is_one_clear_error(tmp_path):
    message = (
        f"model path '{tmp_path / 'nope'}' not found — pass a local directory with config.json, an "
        "offline:<name> model, or a hub id with network access"
    )
    for call in (load_teacher, load_student):
        with pytest.raises(SinkdError) as err:
            call(tmp_path / "nope", COLA)
        assert str(err.value) == message
    with pytest.raises(SinkdError, match="not found"):
        model_fingerprint(tmp_path / "nope")
    with pytest.raises(SinkdError, match="not found"):
        load_config("./no/such/dir")
    with pytest.raises(SinkdError, match="has no config.json"):
        load_teacher(tmp_path, COLA)


def test_load_config_reads_only_the_config(tiny_t5_dir):
    assert load_config(tiny_t5_dir).model_type == "t5"


def test_teacher_dtype(tiny_gptneo_dir):
    teacher = load_teacher(tiny_gptneo_dir, RTE, dtype="bfloat16")
    assert teacher.hf_model.dtype == torch.bfloat16
    assert logits(teacher, batch(teacher)).dtype == torch.float32  # logits are always float32
    with pytest.raises(SinkdError, match="dtype 'int8' is not a floating torch dtype"):
        load_teacher(tiny_gptneo_dir, RTE, dtype="int8")


# ------------------------------------------------------------------------------------------- quantization
def test_8bit_teacher_on_cpu_keeps_head_and_logits(bert_teacher_dir):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from bitsandbytes.nn import Linear8bitLt

    full, int8 = load_teacher(bert_teacher_dir, COLA), load_teacher(bert_teacher_dir, COLA, quantization="8bit")
    assert any(isinstance(m, Linear8bitLt) for m in int8.modules())
    assert type(int8.hf_model.classifier) is torch.nn.Linear  # the head stays in full precision
    assert not any(p.requires_grad for p in int8.parameters()) and not int8.training
    enc = batch(full, ["the dog is good", "a cat was here"])
    torch.testing.assert_close(logits(int8, enc), logits(full, enc), atol=5e-3, rtol=0)


def test_4bit_decoder_teacher_on_cpu(tiny_gptneo_dir):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from bitsandbytes.nn import Linear4bit

    full, nf4 = load_teacher(tiny_gptneo_dir, RTE), load_teacher(tiny_gptneo_dir, RTE, quantization="4bit")
    nf4_layers = [m for m in nf4.modules() if isinstance(m, Linear4bit)]
    assert nf4_layers
    # hidden 32 < the 64-value nf4 block: those layers must not take bitsandbytes' AVX512-BF16 CPU kernel,
    # which cannot repack them (the 64-wide MLP output projection still may)
    assert not any(m.support_avx512bf16_for_cpu for m in nf4_layers if m.in_features % 64)
    enc = batch(full)
    # nf4 keeps ~3 significant bits per weight: logits stay close, not equal
    torch.testing.assert_close(logits(nf4, enc), logits(full, enc), atol=0.1, rtol=0)
    with pytest.raises(SinkdError, match="quantization '3bit' is unknown"):
        load_teacher(tiny_gptneo_dir, RTE, quantization="3bit")


# ----------------------------------------------------------------------------------- the real offline encoder
def test_offline_minilm_student_truncated_to_three_layers(minilm_dir):
    assert offline_minilm_path() == minilm_dir
    full = load_teacher(minilm_dir, COLA)
    student = load_student(minilm_dir, COLA, num_layers=3)
    layers, full_layers = student.hf_model.bert.encoder.layer, full.hf_model.bert.encoder.layer
    assert len(layers) == 3 and len(full_layers) == 6 and student.hf_model.config.num_hidden_layers == 3
    for kept, original in zip(layers, full_layers):
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), original.state_dict().values()))
    assert count_parameters(student) < count_parameters(full)
    enc = batch(student, ["The book was read by John.", "John book the read."])
    assert logits(student, enc).shape == (2, 2)


def test_the_paper_logit_space_is_the_vocabulary_for_generative_models_only():
    from sinkd_ray.models import resolve_logit_space

    assert resolve_logit_space("paper", "decoder") == "vocab"
    assert resolve_logit_space("paper", "encoder-decoder") == "vocab"
    assert resolve_logit_space("paper", "encoder") == "label"
    assert resolve_logit_space("label", "decoder") == "label" and resolve_logit_space(None, "decoder") is None
