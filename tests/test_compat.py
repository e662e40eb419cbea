"""Pins for sft_ray/train/compat.py: each private attribute it uses, where the library keeps it.

When a library release moves one of them, the test named after it fails, instead of a run
silently training differently (a worker's share halved, a Ctrl-C losing the checkpoint).
"""


def test_ray_train_sigint_handler_is_where_the_driver_turns_it_off():
    """driver.fit replaces this method on its trainer: Ray's handler would abort without a checkpoint."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert callable(vars(DataParallelTrainer)["_register_sigint_handler"])


def test_worker_group_startup_timeout_is_a_controller_failure_class():
    from sft_ray.train.compat import worker_group_startup_timeout

    assert issubclass(worker_group_startup_timeout(), Exception)


def test_attn_implementation_is_read_from_the_loaded_model(tiny_model):
    from transformers import AutoModelForCausalLM

    from sft_ray.train.compat import attn_implementation

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    assert attn_implementation(model) == "eager"


def test_trl_token_count_is_the_attribute_it_logs(tiny_model, tmp_path):
    """TRL adds each training batch's tokens to `_total_train_tokens` and logs `_metrics[train][num_tokens]`."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sft_ray.train.compat import set_total_train_tokens, total_train_tokens

    rows = datasets.Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 4)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=SFTConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            max_steps=1,
            per_device_train_batch_size=2,
            report_to="none",
            dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False,
            save_strategy="no",
        ),
        train_dataset=rows,
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    trainer.train()
    assert total_train_tokens(trainer) == 8
    set_total_train_tokens(trainer, 21)
    assert trainer._metrics["train"]["num_tokens"] == [21] and total_train_tokens(trainer) == 21


def test_fsdp_on_cpu_hooks_where_the_trainer_makes_its_accelerator():
    """The override runs inside Trainer.__init__: the method must exist and set `is_fsdp_enabled`
    from the Accelerator state's `fsdp_plugin` (what the override sets). Whether the model is then
    really sharded (DTensor parameters) is asserted by tests/test_fsdp.py on a 2-worker run."""
    import inspect

    from transformers import Trainer

    source = inspect.getsource(Trainer.create_accelerator_and_postprocess)
    assert 'self.is_fsdp_enabled = getattr(self.accelerator.state, "fsdp_plugin", None) is not None' in source
    assert "fsdp_plugin_args" in source


def test_accelerate_sharding_made_a_passthrough_for_a_workers_own_share():
    """Pins the accelerate attributes `unsharded` sets: a loader Accelerate prepared for rank 1 of 2
    keeps every other batch; made a passthrough, it yields all of them, still in the seeded order,
    and the skip on resume (what the HF Trainer calls) skips by index within them."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader, RandomSampler

    from sft_ray.train.compat import unsharded

    def loader():
        data = list(range(12))
        return prepare_data_loader(
            DataLoader(data, batch_size=2, sampler=RandomSampler(data)),
            num_processes=2,
            process_index=1,
            put_on_device=False,
            use_seedable_sampler=True,
            data_seed=7,
        )

    sharded = [b.tolist() for b in loader()]
    assert len(sharded) == 3  # Accelerate's own behaviour, which a worker's share must not get
    own = unsharded(loader())
    own.set_epoch(0)
    batches = [b.tolist() for b in own]
    assert len(batches) == 6 and sorted(x for b in batches for x in b) == list(range(12))
    assert sharded == batches[1::2]  # the same seeded order, all of it
    skipped = skip_first_batches(own, 4)
    skipped.set_epoch(0)
    assert [b.tolist() for b in skipped] == batches[4:]


def test_load_weights_puts_a_checkpoints_adapter_into_the_trainers_model(tiny_model, tmp_path):
    """Early stopping loads the best checkpoint back through `Trainer._load_from_checkpoint`: the
    adapter saved in a folder replaces the model's trained weights, the frozen base stays."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from sft_ray.train.compat import load_weights

    def fresh():
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))

    saved = fresh()
    with torch.no_grad():
        for name, p in saved.named_parameters():
            if "lora_B" in name:
                p.fill_(0.25)
    saved.save_pretrained(tmp_path / "best")
    model = fresh()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none"),
        train_dataset=datasets.Dataset.from_list([{"input_ids": [5, 6], "labels": [5, 6]}]),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    base = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    load_weights(trainer, str(tmp_path / "best"), sharded=False)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.all(p == 0.25) for p in lora_b)
    assert all(p.requires_grad for p in lora_b)  # still trainable, as after a resume
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if "lora_" not in n)
