"""AnoMem, "Anomaly Detection via Multi-Scale Contrasted Memory" (Jezequel et al. 2023).

Stage 1 (Sec. 3.1, Algorithm 1): a ResNet (from scratch) learns representations and a Hopfield
memory HF^(s) (Eq. 1, `anomaly_lab.models.anomem.memory`) after each stage of `layers` (the paper: layer3 with
N_mem 512 and sampling ratio r 0.3, layer4 with 256 and 1). Every training image comes as two SimCLR
views (the datamodule's `train_views`/`view_augmentations`); at each scale, floor(H W r) positions
Omega are drawn and, at each of them, the first view's vector goes through Mem (Eq. 3: HF for normal
samples, unchanged for labelled anomalies) and is contrasted with the second view's by NT-Xent over
the batch (Eq. 4-5, tau 0.1); the variance loss (Eq. 6, lambda_V 0.05) keeps the retrieved prototypes
apart; Eq. 7 sums both over positions and scales with lambda^(s) = 2^(s-1) and divides by sum_s |Omega^(s)|.

Stage 2 (Sec. 3.2): deviation maps Delta^(s) = z^(s) - HF^(s)(z^(s)) per spatial vector (Eq. 8).
`mode=one_class`: the score of a scale is ||Delta^(s)||_2 over the whole map (Eq. 9), nothing is
trained. `mode=semi_supervised`: per scale, an average pool and a two-layer MLP (Eq. 10) trained on the
frozen encoder with the double-hinge loss (Eq. 11-12, M = 2) on the training normals and labelled
anomalies. Scales merge by Eq. 13. The anomaly map (the paper's future work, Sec. 5) is the
per-position ||Delta^(s)||, upsampled to the first scale's size and merged by Eq. 13, in both modes:
it gives pixel metrics on MVTec-like data.

Both stages run in one fit: `stage1_epochs`, then (semi-supervised only) `stage2_epochs`; the model
sets the Trainer's `max_epochs` to their sum. `stage1_ckpt` loads encoder and memories (and k-means
prototypes) from a run's checkpoint and skips stage 1. Optimiser (Sec. 4.2): SGD with Nesterov
momentum and a cosine schedule per stage (per optimiser step).

Ablations (Table 4): `memory=false` trains stage 1 as plain SimCLR (no Mem, no variance loss);
`prototypes=kmeans` replaces the Hopfield retrieval in stage 2 by the nearest of N_mem k-means
centroids fitted on the training normals' vectors of each scale once stage 1 is over; `multi_scale=false`
keeps only the last of `layers`. The paper's baseline is memory=false, prototypes=kmeans,
multi_scale=false. `linear_eval=true` adds the linear evaluation protocol (Table 4a): a logistic
regression on the frozen, globally average-pooled last-stage features of the training normals (which
must span several classes in `Batch.target`), its accuracy on the test images with a class logged as
`test/linear_accuracy`.

Memory usage (issue #20): every stage-1 epoch, a `UsageMonitor` per memory counts how the normal
queries of Eq. 7 use the patterns (first Eq. 1 update): logged as train/memory_<summary>_<layer> and
written, one record per epoch, as `memory_usage` in metrics.json (and kept in checkpoints).

Where the paper is silent (config keys): learning rates, weight decay, epochs, batch size of CPU
runs; `stem` (auto: SimCLR's 3x3 stem for images up to 64 px, given by `image_size`, the ImageNet
stem above; or cifar | imagenet); Hopfield iteration cap and tolerance
(`hopfield_max_iter`, `hopfield_tol`), the patterns' initialisation (`memory_init`: random with
`memory_init_std`, or data: feature vectors of the training normals), `memory_restart` (patterns
unused for an epoch restart on training queries), the normalisation of queries and
patterns in Eq. 1 (`hopfield_norm`: none as written, l2, or layer as in Ramsauer et al.'s Hopfield
layers; the deviation of Eq. 8 then compares the normalised query with its retrieval); `deviation`
(cosine: Eq. 8 on L2-normalised vectors, the geometry NT-Xent trains; raw: as written); what Var
of Eq. 6 runs over (`variance_axis`, see `variance_loss`); phi's output size (`pool_size`) and the
MLP's width (`head_hidden`); k-means settings (`kmeans_iters`, `kmeans_vectors_per_image`); the linear
probe (`linear_steps`, `linear_weight_decay`). Not config keys: Omega is drawn once per scale and
batch (shared by the batch's images) from a generator seeded by `seed`; both views go through the
encoder as one batch (shared batch-norm statistics); stage 2 keeps the encoder in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.anomem.linear_probe import fit_linear_probe
from anomaly_lab.models.anomem.losses import double_hinge, mem, merge_scales, sample_positions, variance_loss
from anomaly_lab.models.anomem.memory import NORMS, HopfieldMemory, UsageMonitor
from anomaly_lab.models.anomem.networks import DistanceHead, ResNetStages, resolve_stem
from anomaly_lab.models.anomem.prototypes import kmeans, nearest_prototype
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.nn.buffers import take_checkpoint_shapes
from anomaly_lab.nn.contrastive import nt_xent
from anomaly_lab.seeding import derive_seed

MODES = ("one_class", "semi_supervised")
PROTOTYPES = ("memory", "kmeans")
DEVIATIONS = ("cosine", "raw")
MEMORY_INITS = ("random", "data")
STAGE1_PREFIXES = ("encoder.", "memories.", "centroids")


class AnoMem(AnomalyModel):
    name = "anomem"

    def __init__(
        self,
        mode: str = "one_class",
        backbone: str = "resnet18",
        backbone_weights: str | None = None,
        stem: str = "auto",
        image_size: int | None = None,
        layers: Sequence[str] = ("layer3", "layer4"),
        memory_sizes: Sequence[int] = (512, 256),
        sampling_ratios: Sequence[float] = (0.3, 1.0),
        scale_weights: Sequence[float] | None = None,
        multi_scale: bool = True,
        memory: bool = True,
        prototypes: str = "memory",
        beta: float = 2.0,
        hopfield_max_iter: int = 5,
        hopfield_tol: float = 1e-3,
        memory_init_std: float = 1.0,
        hopfield_norm: str = "none",
        memory_init: str = "random",
        memory_restart: bool = False,
        temperature: float = 0.1,
        lambda_v: float = 0.05,
        variance_axis: str = "batch",
        margin: float = 2.0,
        deviation: str = "cosine",
        pool_size: int = 2,
        head_hidden: int = 256,
        stage1_epochs: int = 5,
        stage2_epochs: int = 5,
        stage1_ckpt: str | None = None,
        lr: float = 0.05,
        stage2_lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-5,
        kmeans_iters: int = 30,
        kmeans_vectors_per_image: int = 16,
        linear_eval: bool = False,
        linear_steps: int = 100,
        linear_weight_decay: float = 1e-4,
        seed: int = 0,
        map_blur_sigma: float = 4.0,
    ):
        super().__init__(map_blur_sigma=map_blur_sigma)
        self.save_hyperparameters()
        if mode not in MODES:
            raise ConfigError(f"model.mode={mode!r} must be one of {', '.join(MODES)}")
        if memory_init not in MEMORY_INITS:
            raise ConfigError(f"model.memory_init={memory_init!r} must be one of {', '.join(MEMORY_INITS)}")
        if hopfield_norm not in NORMS:
            raise ConfigError(f"model.hopfield_norm={hopfield_norm!r} must be one of {', '.join(NORMS)}")
        if deviation not in DEVIATIONS:
            raise ConfigError(f"model.deviation={deviation!r} must be one of {', '.join(DEVIATIONS)}")
        if prototypes not in PROTOTYPES:
            raise ConfigError(f"model.prototypes={prototypes!r} must be one of {', '.join(PROTOTYPES)}")
        if prototypes == "memory" and not memory:
            raise ConfigError("model.prototypes=memory needs model.memory=true (no memory is learned without it); "
                              "the no-memory baseline of Table 4 is model.prototypes=kmeans")
        layers, memory_sizes, sampling_ratios = list(layers), list(memory_sizes), list(sampling_ratios)
        if not len(layers) == len(memory_sizes) == len(sampling_ratios):
            raise ConfigError(f"model.layers={layers}, model.memory_sizes={memory_sizes} and "
                              f"model.sampling_ratios={sampling_ratios} need one entry per scale")
        if any(not 0 < r <= 1 for r in sampling_ratios) or any(n < 1 for n in memory_sizes):
            raise ConfigError(f"model.sampling_ratios={sampling_ratios} must lie in (0, 1] and "
                              f"model.memory_sizes={memory_sizes} be >= 1")
        if scale_weights is not None and len(scale_weights) != len(layers):
            raise ConfigError(f"model.scale_weights={list(scale_weights)} needs one weight per layer of {layers}")
        weights = list(scale_weights) if scale_weights is not None else [2.0**s for s in range(len(layers))]
        if not multi_scale:  # the single-scale model of Table 4: the last feature map only
            layers, memory_sizes, sampling_ratios, weights = layers[-1:], memory_sizes[-1:], sampling_ratios[-1:], [1.0]
        if min(stage1_epochs, stage2_epochs) < 0:
            raise ConfigError(f"model.stage1_epochs={stage1_epochs} and model.stage2_epochs={stage2_epochs} must be >= 0")
        self.layers, self.memory_sizes, self.sampling_ratios, self.scale_weights = (
            layers, memory_sizes, sampling_ratios, weights)

        self.encoder = ResNetStages(backbone, backbone_weights, layers, resolve_stem(stem, image_size))
        channels = self.encoder.channels
        self.memories = nn.ModuleList(
            HopfieldMemory(c, n, beta, hopfield_max_iter, hopfield_tol, memory_init_std, hopfield_norm)
            for c, n in zip(channels, memory_sizes, strict=True)
        ) if memory else None
        self.usage = [UsageMonitor(n) for n in memory_sizes] if memory else []
        self._last_queries: dict[int, Tensor] = {}  # per scale, the last batch's normal queries (memory_restart)
        self.memory_usage: list[dict[str, Any]] = []  # one record per stage-1 epoch (UsageMonitor.summary)
        for i, (c, n) in enumerate(zip(channels, memory_sizes, strict=True)):
            self.register_buffer(f"centroids_{i}", torch.zeros(c, n))
        self.heads = nn.ModuleList(DistanceHead(c, pool_size, head_hidden) for c in channels) \
            if mode == "semi_supervised" else None
        self.register_buffer("linear_weight", torch.zeros(0))
        self.register_buffer("linear_bias", torch.zeros(0))
        self._positions = torch.Generator().manual_seed(seed)

        self.stage1_epochs = 0 if stage1_ckpt else stage1_epochs
        self.stage2_epochs = stage2_epochs if mode == "semi_supervised" else 0
        if stage1_ckpt:
            self._load_stage1(Path(stage1_ckpt))
        total = self.stage1_epochs + self.stage2_epochs
        self.needs_training = total > 0
        self.trainer_settings = {"max_epochs": max(total, 1), "check_val_every_n_epoch": max(total, 1)}

    # --- stage-1 checkpoint -----------------------------------------------------------------------
    def _load_stage1(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"model.stage1_ckpt={path}: no such checkpoint (expected <run>/checkpoints/last.ckpt)")
        state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
        stage1 = {k: v for k, v in state.items() if k.startswith(STAGE1_PREFIXES)}
        own = {k for k in self.state_dict() if k.startswith(STAGE1_PREFIXES)}
        if set(stage1) != own:
            raise ConfigError(
                f"model.stage1_ckpt={path} does not hold this model's encoder and memories (missing "
                f"{sorted(own - set(stage1))[:3]}, unexpected {sorted(set(stage1) - own)[:3]}): it must come from "
                "an AnoMem run with the same backbone, stem, layers, memory_sizes, memory and multi_scale"
            )
        try:
            self.load_state_dict(stage1, strict=False)
        except RuntimeError as error:
            raise ConfigError(f"model.stage1_ckpt={path}: its tensors do not fit this model ({error})") from None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        take_checkpoint_shapes(self, state_dict, prefix, ("linear_weight", "linear_bias"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- prototypes and deviations ----------------------------------------------------------------
    def centroids(self, scale: int) -> Tensor:
        return getattr(self, f"centroids_{scale}")

    def recall(self, vectors: Tensor, scale: int) -> tuple[Tensor, Tensor]:
        """(the vectors [N, C] in the prototypes' space, the prototype of each): the Hopfield retrieval
        (`hopfield_norm` may normalise the queries), or the nearest k-means centroid."""
        if self.hparams.prototypes == "kmeans":
            return vectors, nearest_prototype(vectors, self.centroids(scale))
        memory = self.memories[scale]
        return memory.query_space(vectors), memory(vectors)

    def deviations(self, features: list[Tensor]) -> list[Tensor]:
        """Eq. 8: Delta^(s) = z^(s) - prototype(z^(s)) at every spatial position, [B, C, h, w] per scale."""
        out = []
        for scale, z in enumerate(features):
            vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            vectors, recalled = self.recall(vectors, scale)
            if self.hparams.deviation == "cosine":
                vectors, recalled = F.normalize(vectors, dim=-1), F.normalize(recalled, dim=-1)
            delta = (vectors - recalled).reshape(z.shape[0], z.shape[2], z.shape[3], z.shape[1])
            out.append(delta.permute(0, 3, 1, 2))
        return out

    # --- stage 1 ------------------------------------------------------------------------------------
    def stage1_loss(self, views: Tensor, normal: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 7 for two views [B, 2, C, H, W] and the normal mask [B]; also its parts for logging."""
        batch = views.shape[0]
        features = self.encoder(torch.cat([views[:, 0], views[:, 1]]))
        total, count, logs = views.new_zeros(()), 0, {}
        for scale, z in enumerate(features):
            _, channels, height, width = z.shape
            omega = sample_positions(height, width, self.sampling_ratios[scale], self._positions).to(z.device)
            picked = z.flatten(2).index_select(2, omega).permute(2, 0, 1)  # [P, 2B, C]
            first, second = picked[:, :batch], picked[:, batch:]
            variance = first.new_zeros(len(omega))
            if self.memories is not None:  # both views in the space the memory compares vectors in
                memory = self.memories[scale]
                first, second = memory.query_space(first), memory.query_space(second)
                retrieved = memory(first)
                queries = first[:, normal].reshape(-1, channels)
                self.usage[scale].update(memory.weights(queries))
                if self.hparams.memory_restart:
                    self._last_queries[scale] = queries.detach()
                contrast = mem(first, retrieved, normal)
                variance = variance_loss(retrieved, normal, self.hparams.variance_axis)
            else:
                contrast = first
            com = nt_xent(contrast, second, self.hparams.temperature)  # [P]
            total = total + self.scale_weights[scale] * (com + self.hparams.lambda_v * variance).sum()
            count += len(omega)
            logs[f"train/com_{self.layers[scale]}"] = com.mean()
            logs[f"train/variance_{self.layers[scale]}"] = variance.mean()
        return total / count, logs

    # --- stage 2 ------------------------------------------------------------------------------------
    def distances(self, deviations: list[Tensor]) -> list[Tensor]:
        """Per-scale anomaly distances [B]: ||Delta^(s)||_2 (Eq. 9) or g^(s) o phi(Delta^(s)) (Eq. 10)."""
        if self.heads is None:
            return [torch.linalg.vector_norm(d.flatten(1), dim=1) for d in deviations]
        return [head(d) for head, d in zip(self.heads, deviations, strict=True)]

    def stage2_loss(self, images: Tensor, normal: Tensor) -> Tensor:
        """Eq. 12: the double-hinge loss averaged over samples and scales, the encoder frozen."""
        self.encoder.eval()
        with torch.no_grad():
            deviations = self.deviations(self.encoder(images))
        losses = [double_hinge(d, normal, self.hparams.margin) for d in self.distances(deviations)]
        return torch.stack(losses).mean()

    # --- training loop --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if self.stage1_epochs and getattr(datamodule, "train_views", 0) < 2:
            raise ConfigError("AnoMem's stage 1 needs two views of every training image: data.train_views=2 and "
                              "data.view_augmentations (conf/model/anomem.yaml sets both)")
        if self.stage2_epochs and getattr(datamodule, "anomaly_ratio", 0) == 0:
            raise ConfigError("model.mode=semi_supervised needs labelled anomalies: set data.anomaly_ratio > 0 "
                              "(a one-vs-all or wmca/pp|sr|pm|fm dataset), or model.mode=one_class")
        if self.stage1_epochs and self.memories is not None and self.hparams.memory_init == "data" \
                and self.trainer.current_epoch == 0:
            self.init_memories_from_data(datamodule.normal_dataloader(self.global_rank, self.trainer.world_size))

    def in_stage1(self) -> bool:
        return self.current_epoch < self.stage1_epochs

    def reseed_training(self, seed: int) -> None:
        self._positions.manual_seed(seed)  # Omega (Eq. 7)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        for monitor in self.usage:
            monitor.reset()
        if self.current_epoch == self.stage1_epochs and self.stage2_epochs:
            self.encoder.requires_grad_(False)
            if self.memories is not None:
                self.memories.requires_grad_(False)
            if self.hparams.prototypes == "kmeans":  # stage 2 trains on the deviations from the centroids
                datamodule = self.trainer.datamodule
                with torch.no_grad():
                    self.fit_kmeans(datamodule.normal_dataloader(self.global_rank, self.trainer.world_size))

    def on_train_epoch_end(self) -> None:
        if not (self.in_stage1() and self.usage):
            return
        record = {"epoch": self.current_epoch}
        for scale, (layer, monitor) in enumerate(zip(self.layers, self.usage, strict=True)):
            record[layer] = monitor.summary(self.sum_across_devices)
            if self.hparams.memory_restart and self.current_epoch + 1 < self.stage1_epochs:
                record[layer]["restarted"] = self.restart_unused(scale)
            self.log_dict({f"train/memory_{key}_{layer}": float(value) for key, value in record[layer].items()})
        self.memory_usage.append(record)

    def restart_unused(self, scale: int) -> int:
        """memory_restart: the patterns no query of the epoch used move onto normal queries of its last
        batch (gathered over the devices, drawn with a seed shared by all of them), and their momentum is
        cleared: a dead pattern gets no gradient through the retrieval and would stay dead. The restart
        of VQ codebooks; the paper has none. Not after the last stage-1 epoch: a restarted pattern is
        there to be trained, and the memory that scores is the trained one."""
        if scale not in self._last_queries:
            return 0
        memory = self.memories[scale]
        dead = self.usage[scale].unused(self.sum_across_devices)
        candidates = self.gather_across_devices(self._last_queries[scale])
        generator = torch.Generator().manual_seed(derive_seed(self.hparams.seed, self.current_epoch, scale))
        moved = memory.restart(dead, candidates, generator)
        state = self.optimizers().optimizer.state.get(memory.patterns, {}) if moved else {}
        if state.get("momentum_buffer") is not None:
            state["momentum_buffer"][:, dead.to(memory.patterns.device)] = 0
        return moved

    def training_record(self) -> dict[str, Any]:
        return {"memory_usage": self.memory_usage} if self.memory_usage else {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["memory_usage"] = self.memory_usage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.memory_usage = list(checkpoint.get("memory_usage", []))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        normal = batch.label == 0
        if self.in_stage1():
            if batch.views is None or batch.views.shape[1] < 2:
                raise ConfigError("AnoMem's stage 1 needs data.train_views=2 (two views per image)")
            loss, logs = self.stage1_loss(batch.views[:, :2], normal)
            self.log_dict(logs)
            self.log("train/loss_stage1", loss, prog_bar=True)
        else:
            loss = self.stage2_loss(batch.image, normal)
            self.log("train/loss_stage2", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        groups, lambdas = [], []
        steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max(1, self.trainer.max_epochs))
        stage1_steps, stage2_steps = self.stage1_epochs * steps_per_epoch, self.stage2_epochs * steps_per_epoch
        if self.stage1_epochs:
            params = [*self.encoder.parameters(), *(self.memories.parameters() if self.memories is not None else [])]
            groups.append({"params": params, "lr": hp.lr})
            lambdas.append(lambda step: cosine(step, 0, stage1_steps))
        if self.stage2_epochs:
            groups.append({"params": list(self.heads.parameters()), "lr": hp.stage2_lr})
            lambdas.append(lambda step: cosine(step, stage1_steps, stage2_steps))
        optimizer = torch.optim.SGD(groups, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- statistics of the training normals: k-means prototypes, linear probe ----------------------
    def fit_normal(self, dataloader: DataLoader) -> None:
        if self.hparams.prototypes == "kmeans":
            self.fit_kmeans(dataloader)
        if self.hparams.linear_eval:
            self.fit_linear(dataloader)

    def normal_vectors(self, dataloader: DataLoader, generator: torch.Generator,
                       batch_statistics: bool = False) -> list[Tensor]:
        """Per scale, the feature vectors [N, C] at `kmeans_vectors_per_image` random positions of every
        image of `dataloader`, gathered over the devices. The encoder runs in eval mode, or with
        `batch_statistics` in train mode (batch norm on each batch's statistics, as training queries
        are computed) with its running statistics left as they were."""
        per_scale = [[] for _ in self.layers]
        was_training = self.encoder.training
        running = {key: value.clone() for key, value in self.encoder.state_dict().items()
                   if key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        self.encoder.train(batch_statistics)
        with torch.no_grad():
            for batch in dataloader:
                for scale, z in enumerate(self.encoder(batch.image.to(self.device))):
                    vectors = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, z.shape[1])
                    keep = min(self.hparams.kmeans_vectors_per_image, vectors.shape[1])
                    index = torch.rand(vectors.shape[:2], generator=generator).argsort(dim=1)[:, :keep]
                    index = index.to(self.device).unsqueeze(-1).expand(-1, -1, z.shape[1])
                    per_scale[scale].append(vectors.gather(1, index).flatten(0, 1))
        self.encoder.train(was_training)
        self.encoder.load_state_dict(running, strict=False)
        return [self.gather_across_devices(torch.cat(chunks)).float() for chunks in per_scale]

    def fit_kmeans(self, dataloader: DataLoader) -> None:
        """N_mem centroids per scale from `kmeans_vectors_per_image` random positions of every training normal."""
        generator = torch.Generator().manual_seed(self.hparams.seed)
        for scale, vectors in enumerate(self.normal_vectors(dataloader, generator)):
            centroids = kmeans(vectors, self.memory_sizes[scale], self.hparams.kmeans_iters, generator)
            self.centroids(scale).copy_(centroids)

    def init_memories_from_data(self, dataloader: DataLoader) -> None:
        """memory_init=data: each scale's patterns start as N_mem feature vectors of the training normals
        (drawn with the seed; with replacement when there are fewer vectors than patterns), computed as
        stage 1 computes its queries (batch norm on batch statistics), so that they start at their scale."""
        generator = torch.Generator().manual_seed(self.hparams.seed)
        vectors_per_scale = self.normal_vectors(dataloader, generator, batch_statistics=True)
        for memory, vectors in zip(self.memories, vectors_per_scale, strict=True):
            every = torch.ones(memory.patterns.shape[1], dtype=torch.bool)
            memory.restart(every, vectors, generator)  # every pattern onto a drawn vector

    def pooled_features(self, images: Tensor) -> Tensor:
        """The globally average-pooled last-stage features [B, C]: what the linear probe sees."""
        return self.encoder(images)[-1].mean(dim=(2, 3))

    def fit_linear(self, dataloader: DataLoader) -> None:
        features, targets = [], []
        for batch in dataloader:
            if batch.target is None:
                raise ConfigError("model.linear_eval=true needs the class of every training image (Batch.target): "
                                  "use a dataset whose training images span several classes")
            features.append(self.pooled_features(batch.image.to(self.device)))
            targets.append(batch.target.to(self.device))
        features, targets = self.gather_across_devices(torch.cat(features)), self.gather_across_devices(torch.cat(targets))
        if len(targets.unique()) < 2:
            raise ConfigError(f"model.linear_eval=true needs training images of several classes, found only class "
                              f"{int(targets[0])}: train on a whole dataset, not one-vs-all")
        weight, bias = fit_linear_probe(features.double().cpu(), targets.cpu(), int(targets.max()) + 1,
                                        self.hparams.linear_steps, self.hparams.linear_weight_decay)
        self.linear_weight, self.linear_bias = weight.float().to(self.device), bias.float().to(self.device)

    # --- scoring ------------------------------------------------------------------------------------
    def score(self, images: Tensor) -> ScoreOutput:
        deviations = self.deviations(self.encoder(images))
        image_score = merge_scales(self.distances(deviations), self.scale_weights)
        size = deviations[0].shape[-2:]
        maps = [F.interpolate(torch.linalg.vector_norm(d, dim=1, keepdim=True), size=size, mode="bilinear",
                              align_corners=False) for d in deviations]
        return ScoreOutput(image_score=image_score, anomaly_map=merge_scales(maps, self.scale_weights))

    def on_test_epoch_start(self) -> None:
        self._linear_counts = torch.zeros(2, device=self.device)

    def test_step(self, batch, batch_idx: int) -> dict[str, Any]:
        out = super().test_step(batch, batch_idx)
        if self.hparams.linear_eval and batch.target is not None:
            keep = (batch.label == 0) & (batch.target < len(self.linear_bias))
            if not keep.any():
                return out
            logits = self.pooled_features(batch.image[keep]) @ self.linear_weight.T + self.linear_bias
            correct = (logits.argmax(dim=1) == batch.target[keep]).sum()
            self._linear_counts += torch.stack([correct.float(), keep.sum().float()])
        return out

    def on_test_epoch_end(self) -> None:
        if self.hparams.linear_eval:
            correct, total = self.sum_across_devices(self._linear_counts)
            self.log("test/linear_accuracy", correct / total.clamp_min(1))


def cosine(step: int, start: int, length: int) -> float:
    """Cosine annealing from 1 to 0 over [start, start + length) steps; 0 outside."""
    if length <= 0 or not start <= step < start + length:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (step - start) / length))
