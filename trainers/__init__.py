"""Training recipes that turn a base model and a data file into a registered adapter.

Layout: `data/` (records, readers, labels, tokenize, collate; preference for pair and prompt
files) -> `modeling` (load the base per task; `set_up_training`) -> `methods/` (a typed `Method`
each: lora, qlora, bottleneck, full) -> `loop` (Accelerate) -> `export` (history, card,
`hub.store.LocalStore.put`). One readable recipe per task: `classification`, `ner`,
`instruction` (and the preference recipes `reward`, `dpo`, `ppo`); `cli` builds the
`adapterdock train` command from their Config dataclasses. Depends on `hub`, never on `server`.
"""
