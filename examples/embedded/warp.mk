# Iterated WARP on a fine-tuned policy and its reward model:
#   for each iteration i: rlhf x len(SEEDS) from init_i (EMA anchor) ->
#   warp merge (per-layer SLERP + LITI sweep ETAS); init_{i+1} = eta-$(NEXT_ETA)
# plus, for comparison, one run of iteration 1 anchored to the fixed SFT
# policy; then one eval table over the SFT policy, every RL run (with its
# snapshots, the reward-KL trajectory) and every LITI point.
#
#   make -f examples/embedded/warp.mk RUN=runs/embedded POSTTRAIN=target/release/posttrain
#
# REWARD_FLAGS=--task-reward trains on the task scorer instead of the reward
# model (which still fills the eval table's reward column); W=DIR puts the
# runs elsewhere.
#
# Every output is a checkpoint directory written atomically, so make's
# timestamps are the dependencies: a finished run re-made does nothing, and
# deleting one output re-makes it and what depends on it.

POSTTRAIN ?= posttrain
RUN ?= runs/embedded
SFT ?= $(RUN)/sft_live
REWARD_MODEL ?= $(RUN)/rm
PROMPTS ?= $(RUN)/task/train_prompts.jsonl
EVAL_PROMPTS ?= $(RUN)/task/eval_prompts.jsonl
ITERATIONS ?= 2
SEEDS ?= 0 1
ETAS ?= 0.1,0.3,0.5,0.7,1.0
NEXT_ETA ?= 0.30
REWARD_FLAGS ?= --reward $(REWARD_MODEL)
RLHF_FLAGS ?= --steps 300 --lr 3e-4 --snapshot-every 100
EVAL_FLAGS ?= --samples 4
# more checkpoints for the eval table (e.g. the teacher)
EXTRA_CHECKPOINTS ?=

W ?= $(RUN)/warp
ITERS := $(shell seq 1 $(ITERATIONS))
comma := ,
init_of = $(if $(filter 1,$(1)),$(SFT),$(W)/it$(shell expr $(1) - 1)/merge)
init_dir = $(if $(filter 1,$(1)),$(SFT),$(W)/it$(shell expr $(1) - 1)/merge/eta-$(NEXT_ETA))
runs_of = $(foreach s,$(SEEDS),$(W)/it$(1)/rl-s$(s))
points_of = $(foreach e,$(subst $(comma), ,$(ETAS)),$(W)/it$(1)/merge/eta-$(shell printf '%.2f' $(e)))

.PHONY: warp
warp: $(W)/eval.jsonl

define iteration
$(W)/it$(1)/rl-s%: $(call init_of,$(1)) $(REWARD_MODEL) $(PROMPTS)
	$(POSTTRAIN) rlhf --policy $(call init_dir,$(1)) $(REWARD_FLAGS) --prompts $(PROMPTS) \
	  --seed $$* --out $$@ $(RLHF_FLAGS)

$(W)/it$(1)/merge: $(call runs_of,$(1))
	$(POSTTRAIN) warp merge --init $(call init_dir,$(1)) --policies $$^ --eta $(ETAS) --out $$@
endef
$(foreach i,$(ITERS),$(eval $(call iteration,$(i))))

$(W)/it1/sft-anchor: $(SFT) $(REWARD_MODEL) $(PROMPTS)
	$(POSTTRAIN) rlhf --policy $(SFT) $(REWARD_FLAGS) --prompts $(PROMPTS) --anchor sft \
	  --seed $(firstword $(SEEDS)) --out $@ $(RLHF_FLAGS)

$(W)/eval.jsonl: $(foreach i,$(ITERS),$(W)/it$(i)/merge) $(W)/it1/sft-anchor
	$(POSTTRAIN) eval --checkpoints $(EXTRA_CHECKPOINTS) $(SFT) $(W)/it1/sft-anchor $(wildcard $(W)/it1/sft-anchor/snapshots/*) \
	  $(foreach i,$(ITERS),$(foreach r,$(call runs_of,$(i)),$(r) $(wildcard $(r)/snapshots/*)) $(call points_of,$(i))) \
	  --prompts $(EVAL_PROMPTS) --reward $(REWARD_MODEL) --reference $(SFT) $(EVAL_FLAGS) --out $@ --overwrite
