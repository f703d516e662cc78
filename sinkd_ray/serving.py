"""The exported student as an MLflow model: what ``models:/sinkd-<task>-student@best`` loads with MLflow's own calls.

- Encoder students (a classification head) are logged with MLflow's transformers flavour as a text-classification
  pipeline: ``mlflow.transformers.load_model`` gives the pipeline, ``mlflow.pyfunc.load_model(...).predict``
  returns the label names (``id2label``) and scores, and ``mlflow models serve`` answers ``{"inputs": [...]}``.
- Generative students (decoder-only, encoder-decoder) answer with a label word at the answer position, which no
  transformers pipeline expresses: they are logged as `LabelWordClassifier`, a small pyfunc model whose ``predict``
  renders the task's prompt and returns label names (the same label-word logits the student was trained on).

Either way the ``save_pretrained`` folder is logged inside the model, so the weights travel with the version.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from sinkd_ray.models import META_FILE, uses_prompt

PIPELINE_TASK = "text-classification"


class LabelWordClassifier(mlflow.pyfunc.PythonModel):
    """A generative student as a classifier: the prompt, the label words' logits at the answer position, the label
    with the largest. Artifacts: ``student`` (its folder); model_config: ``task`` (registry name)."""

    def load_context(self, context) -> None:
        from sinkd_ray.models import load_student
        from sinkd_ray.tasks import get_task

        self.task = get_task(context.model_config["task"])
        self.model = load_student(context.artifacts["student"], self.task).eval()

    def predict(self, context, model_input, params=None) -> list[str]:
        import pandas as pd
        import torch

        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
        fields = self.task.text_fields
        texts = [row if isinstance(row, dict) else {fields[0]: row} for row in rows]
        prompts = [self.task.template.format(**{f: t[f] for f in fields}) for t in texts]
        batch = self.model.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen = self.model.class_logits(logits).argmax(-1).tolist()
        return [self.task.label_names[i] for i in chosen]


def _requirements() -> list[str]:
    """Given explicitly: MLflow's inference loads the model in a subprocess and, for the transformers flavour,
    insists on pinning torchvision (not installed here), which fails the whole log_model."""
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"transformers=={transformers.__version__}", f"torch=={torch.__version__}"]


def student_family(student_dir: Path) -> str:
    meta = Path(student_dir) / META_FILE
    return json.loads(meta.read_text())["family"] if meta.is_file() else "encoder"


def log_student(student_dir: Path, task, examples: list, card: str) -> str:
    """Log the exported student into the active run as an MLflow model; returns its model URI (``models:/m-…``).
    ``examples``: a few inputs as `predict` takes them (strings, or dicts of the task's text fields for pairs)."""
    from mlflow.models import infer_signature

    if not uses_prompt(student_family(student_dir)):
        import transformers
        from huggingface_hub import ModelCard

        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(student_dir))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(student_dir))
        pipe = transformers.pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer)
        if task.is_pair:  # the pipeline reads a pair as {"text", "text_pair"}
            examples = [{"text": e[task.text_fields[0]], "text_pair": e[task.text_fields[1]]} for e in examples]
        info = mlflow.transformers.log_model(
            transformers_model=pipe,
            name="student",
            task=PIPELINE_TASK,
            input_example=examples,
            signature=infer_signature(examples, pipe(examples)),
            pip_requirements=_requirements(),
            model_card=ModelCard(card),  # else it looks the card up on the hub
            save_pretrained=True,
        )
        return info.model_uri
    wrapper = LabelWordClassifier()
    info = mlflow.pyfunc.log_model(
        name="student",
        python_model=wrapper,
        artifacts={"student": str(student_dir)},
        model_config={"task": task.name},
        input_example=examples,
        signature=infer_signature(examples, [task.label_names[0]] * len(examples)),
        pip_requirements=[*_requirements(), "sinkd-ray"],
    )
    return info.model_uri
