"""OKD-style online teacher modules (arXiv 2409.12512): the teacher adapts to the student while both train.

What is implemented:
- LoRA modules (``peft``; rank r, scaling α = 2r, no dropout) on the teacher's attention query and value
  projections. Every base weight of the teacher stays frozen (``requires_grad=False``) and bit-identical;
  only the modules train. The teacher stays in eval mode (no dropout).
- Each step the teacher runs live on the batch; the student's objective sees its logits detached, exactly
  as it sees a frozen teacher's (so the logit cache cannot be used: it is bypassed automatically).
- Teacher loss ``objective.online_teacher_loss``: CE(y, z_T) + η·KL_τKL(s ‖ t). Own AdamW (``online_lr``, same
  warm-up / linear decay as the student), stepped with the student's optimizer. With several workers the
  teacher is replicated, so its gradients are averaged by an all-reduce before each step.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from sinkd_ray.config import DistillConfig
from sinkd_ray.errors import SinkdError
from sinkd_ray.objective import online_teacher_loss

# Attention projections that get LoRA modules, first match wins (BERT/RoBERTa, GPT-Neo/Llama, T5/MPNet).
LORA_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"))


class OnlineTeacher:
    def __init__(self, live, dcfg: DistillConfig, *, total_steps: int, warmup_steps: int):
        """``live``: the worker's live teacher (a `worker.TeacherLogits` holding the frozen teacher)."""
        from peft import LoraConfig, inject_adapter_in_model
        from transformers import get_linear_schedule_with_warmup

        self.live, self.dcfg = live, dcfg
        model = live.teacher.hf_model
        linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        targets = next((list(pair) for pair in LORA_TARGETS if set(pair) <= linear), None)
        if targets is None:
            raise SinkdError(
                f"online teacher: no attention query/value projections found in "
                f"{type(model).__name__} (looked for {LORA_TARGETS}) — this architecture is not "
                f"supported with --online-teacher"
            )
        inject_adapter_in_model(
            LoraConfig(r=dcfg.online_rank, lora_alpha=2 * dcfg.online_rank, lora_dropout=0.0, target_modules=targets),
            model,
        )
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        live.teacher.eval()
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=dcfg.online_lr, weight_decay=0.0)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)

    def logits(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.live.forward("train", idx, device)

    def loss(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_T = CE(y, z_T) + η·KL_τKL(s ‖ t), gradients to the teacher's modules only."""
        return online_teacher_loss(teacher_logits, student_logits, labels, self.dcfg)

    def step(self) -> None:
        if dist.is_initialized():
            for p in self.params.values():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # The modules are replicated on every rank: rank 0 saves them, every rank loads them.
    def save(self, path) -> None:
        tensors = {f"module/{n}": p.detach().cpu().contiguous() for n, p in self.params.items()}
        for i, p in enumerate(self.params.values()):
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"optim/{i}/{key}"] = value.detach().cpu().contiguous()
        save_file(tensors, str(path), metadata={"scheduler": json.dumps(self.scheduler.state_dict())})

    def load(self, path) -> None:
        from safetensors import safe_open

        tensors = load_file(str(path))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[f"module/{name}"])
        for i, p in enumerate(self.params.values()):
            state = {k.rsplit("/", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optim/{i}/")}
            if state:
                self.optimizer.state[p] = state
        with safe_open(str(path), "pt") as handle:
            self.scheduler.load_state_dict(json.loads(handle.metadata()["scheduler"]))
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
