"""Training recipes that turn a base model and a data file into a registered adapter.

Layout: `data/` (records, readers, tokenize, collate) -> `modeling` (load the base per task) ->
`methods/` (lora, qlora, bottleneck, full) -> `loop` (Accelerate) -> `export` (history, card,
`hub.store.LocalStore.put`). One readable recipe per task: `classification`, `ner`,
`instruction` (and the preference recipes `reward`, `dpo`, `ppo`); `cli` builds the
`adapterdock train` command from their Config dataclasses. Depends on `hub`, never on `server`.
"""
