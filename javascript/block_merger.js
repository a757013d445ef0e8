// Block Merger's page script. The WebUI loads every javascript/*.js of an extension; the standalone app
// (python -m lib_merge ui) runs this file on page load. Everything here acts only inside the tab's root element
// (#tab_block_merger), so the rest of the WebUI is untouched.
//  - hover hints: a titles map keyed by the tab's elem_ids, as the WebUI's own hints.js keys by text; the hint goes
//    into the element's `title`, which is how the WebUI shows its tooltips;
//  - Ctrl+Enter (Cmd+Enter) inside the tab runs Merge (where no model can be loaded, as in the standalone app:
//    Merge to file);
//  - blockMergerConfirmOverwrite: asked by the tab before "Merge to file" replaces an existing file;
//  - blockMergerSliderMoved: a block slider's value written into the weights text, in the page;
//  - blockMergerTxt2img: the txt2img tab's live values, read when Generate, Merge & Generate or a plot is pressed
//    (ui/tab_generation.py): the tab's blank generation fields take them.
(function() {
    "use strict";

    const ROOT_ID = "tab_block_merger";

    // elem_id -> hint (JSON: tests/test_frontend.py reads it to check that every id exists in the tab)
    const blockMergerTitles = {
        "bm_model_a": "Model A: the base of the merge; its keys, dtype and extra parts are kept where B and C have none",
        "bm_model_b": "Model B: the model merged into A",
        "bm_model_c": "Model C: the third model of Add difference (A+(B-C)*alpha), Triple sum and sum Twice",
        "bm_refresh": "Read the models folder again (new or renamed checkpoints)",
        "bm_mode": "How A, B and C are combined; the formula of the chosen mode is shown below the choices",
        "bm_calc": "How each key's ratio or difference is computed; 'normal' is the merge mode's formula",
        "bm_alpha": "alpha: the ratio of B. Weight sum: A*(1-alpha)+B*alpha; Add difference: A+(B-C)*alpha. With MBW on, the 26 block weights replace it",
        "bm_beta": "beta: the ratio of C in Triple sum (A*(1-alpha-beta)+B*alpha+C*beta) and sum Twice ((A*(1-alpha)+B*alpha)*(1-beta)+C*beta); the start row in tensor/tensor2; the threshold of extract",
        "bm_options": "Save settings, dtype, VAE, the output name, gamma and the weight seed",
        "bm_save_flags": "save model: also write the merge to a file when merging; overwrite: replace a file of the same name (you are asked first); prune: drop EMA and training-only keys; Reset CLIP ids: restore position_ids to 0..76; copy config: model A's .yaml beside the saved file",
        "bm_save_dtype": "The dtype written to the file: keep = each key as in model A",
        "bm_bake_vae": "Write this VAE's weights into the saved file instead of A's",
        "bm_custom_name": "File name of the merge in the models folder (blank: a name made from the recipe)",
        "bm_gamma": "gamma (extract): how selective the feature extraction is; larger keeps only the most similar features",
        "bm_seed": "Seed of the random weights (R/U presets) and of plus random's noise; -1 draws a new one",
        "bm_mbw": "Block weights: one ratio per U-Net block (MBW) instead of one alpha for the whole model",
        "bm_use_mbw": "Use the 26 (SDXL: 20) block weights below instead of alpha (and of beta, when beta weights are given)",
        "bm_block_type": "SD1: 26 weights (BASE, IN00-IN11, M00, OUT00-OUT11); SDXL: 20 (BASE, IN00-IN08, M00, OUT00-OUT08)",
        "bm_preset": "A named set of block weights (presets file); choosing one fills the alpha weights and turns MBW on",
        "bm_weights_alpha": "Block weights for alpha, comma separated: BASE, IN00-IN11, M00, OUT00-OUT11 (or a preset name); each block merges as A*(1-w)+B*w in Weight sum",
        "bm_weights_beta": "Block weights for beta (optional): numbers or a preset name; blank uses beta for every block",
        "bm_chart": "The block weights as a curve: alpha (and beta) per block, from BASE through IN, M00 and OUT",
        "bm_blocks": "One slider per block: IN blocks down the left, OUT blocks up the right, M00 at the bottom; moving a slider updates the text above",
        "bm_w_BASE": "BASE: the text encoder(s), the VAE and every other key outside the U-Net",
        "bm_w_IN00": "IN00: the U-Net's input convolution and the time embedding",
        "bm_w_IN01": "IN01: input ResNet + attention, full resolution (composition, fine detail)",
        "bm_w_IN02": "IN02: input ResNet + attention, full resolution",
        "bm_w_IN03": "IN03: downsample to 1/2",
        "bm_w_IN04": "IN04: input ResNet + attention, 1/2 resolution",
        "bm_w_IN05": "IN05: input ResNet + attention, 1/2 resolution",
        "bm_w_IN06": "IN06: downsample to 1/4",
        "bm_w_IN07": "IN07: input ResNet + attention, 1/4 resolution",
        "bm_w_IN08": "IN08: input ResNet + attention, 1/4 resolution",
        "bm_w_IN09": "IN09: downsample to 1/8 (SD1 only)",
        "bm_w_IN10": "IN10: input ResNet, 1/8 resolution (SD1 only)",
        "bm_w_IN11": "IN11: input ResNet, 1/8 resolution (SD1 only)",
        "bm_w_M00": "M00: the middle block, lowest resolution (overall structure)",
        "bm_w_OUT00": "OUT00: output ResNet, lowest resolution; its skip connection comes from IN11",
        "bm_w_OUT01": "OUT01: output ResNet, lowest resolution (skip from IN10)",
        "bm_w_OUT02": "OUT02: output ResNet and upsample (skip from IN09)",
        "bm_w_OUT03": "OUT03: output ResNet + attention, 1/4 resolution (skip from IN08)",
        "bm_w_OUT04": "OUT04: output ResNet + attention, 1/4 resolution (skip from IN07)",
        "bm_w_OUT05": "OUT05: output ResNet + attention and upsample (skip from IN06)",
        "bm_w_OUT06": "OUT06: output ResNet + attention, 1/2 resolution (skip from IN05)",
        "bm_w_OUT07": "OUT07: output ResNet + attention, 1/2 resolution (skip from IN04)",
        "bm_w_OUT08": "OUT08: output ResNet + attention and upsample (skip from IN03)",
        "bm_w_OUT09": "OUT09: output ResNet + attention, full resolution (skip from IN02; SD1 only)",
        "bm_w_OUT10": "OUT10: output ResNet + attention, full resolution (skip from IN01; SD1 only)",
        "bm_w_OUT11": "OUT11: output ResNet + attention and the final norm and convolution (skip from IN00; SD1 only)",
        "bm_elemental_acc": "Elemental: ratios for single elements (key substrings) of chosen blocks",
        "bm_elemental": "Rules 'Blocks:Elements:Ratio', e.g. OUT06:attn:0.5 merges OUT06's attention keys at 0.5; NOT before a block or element excludes it",
        "bm_adjust_acc": "Adjust: small offsets to the merged model's input/output layers that change detail, contrast, brightness and colour",
        "bm_adjust": "Eight numbers: IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3 (blank = off); the sliders below set them",
        "bm_adj_IN": "IN: detail/noise through the input convolution: weight x (1-0.01*IN), bias x (1+0.02*IN)",
        "bm_adj_OUT": "OUT: detail/noise through the output normalisation: weight x (1-0.01*OUT), bias x (1+0.02*OUT)",
        "bm_adj_OUT2": "OUT2: detail/noise through the final convolution: weight x (1-0.01*OUT2)",
        "bm_adj_CONT": "CONT: contrast: adds 0.02*CONT to the final convolution's bias on latent channel 0",
        "bm_adj_BRI": "BRI: brightness: shifts the final convolution's bias on latent channels 1-3 (0.02 per step)",
        "bm_adj_COL1": "COL1: cyan (negative) to red (positive)",
        "bm_adj_COL2": "COL2: magenta (negative) to green (positive)",
        "bm_adj_COL3": "COL3: yellow (negative) to blue (positive)",
        "bm_inex_acc": "Include / Exclude: merge only the chosen blocks and elements, or all but them",
        "bm_inex": "Off: merge every key; Include: only the chosen blocks/elements; Exclude: all but them (the others stay as A)",
        "bm_inex_blocks": "The blocks Include/Exclude applies to",
        "bm_inex_elements": "Key substrings Include/Exclude applies to, e.g. attn2, norm",
        "bm_lora_kind": "Show only LoRAs of this type (LoRA, LoCon, or other LyCORIS kinds such as LoHa and LoKr)",
        "bm_lora_family": "Show only LoRAs made for this model family (read from their keys and widths)",
        "bm_lora_list": "The LoRA files of the WebUI's Lora folder; pick one to add it or inspect it",
        "bm_lora_default_ratio": "The strength a LoRA added from the list gets",
        "bm_lora_add": "Add the picked LoRA to the list below as name:ratio",
        "bm_lora_refresh": "Read the Lora folder again (new or renamed files)",
        "bm_lora_inspect": "Show the picked LoRA's type, ranks, alpha, family and training metadata",
        "bm_lora_specs": "One LoRA per line: name:ratio, or name:ratio:block weights (a LoRA Block Weight preset name, or 12/17/20/26 values)",
        "bm_lora_from_prompt": "Fill the list from the <lora:...> and <lyco:...> tags of the txt2img prompt (lbw= block weights included)",
        "bm_lora_history_id": "A logged LoRA operation's ID (-1 = the last one)",
        "bm_lora_load": "Put the LoRAs and options of that logged operation back into this tab",
        "bm_lora_live_name": "The name the loaded model shows after the bake (blank: the base's name plus the LoRAs)",
        "bm_lora_bake_loaded": "Add the LoRAs to the loaded model's own weights (only the touched tensors change; Restore base model undoes it)",
        "bm_lora_model": "The checkpoint the LoRAs are baked into; the result is a new file",
        "bm_lora_file_dtype": "The dtype of the baked checkpoint file (keep = as the checkpoint)",
        "bm_lora_bake_file": "Write the checkpoint with the LoRAs baked in to a new file",
        "bm_lora_rank": "concat: exact (the ranks add up); N: re-rank by SVD to N; auto: the smallest rank that keeps most of the energy",
        "bm_lora_metadata": "Which metadata the merged LoRA carries",
        "bm_lora_merge": "Merge the listed LoRAs (with their ratios and block weights) into one LoRA file",
        "bm_lora_a": "The tuned model: the LoRA is extracted from alpha*A - beta*B",
        "bm_lora_b": "The base model the LoRA will be applied to",
        "bm_lora_alpha": "alpha: the weight of model A in alpha*A - beta*B",
        "bm_lora_beta": "beta: the weight of model B in alpha*A - beta*B",
        "bm_lora_xrank": "The extracted LoRA's rank: a number (default 128) or auto",
        "bm_lora_conv_rank": "Rank for 3x3 convolutions (LoCon); blank extracts none",
        "bm_lora_extract": "Extract a LoRA from the two checkpoints into a new file in the Lora folder",
        "bm_lora_diff_alpha": "alpha: 0 takes B's factors, 1 C's, between mixes them",
        "bm_lora_diff_beta": "beta: 0 keeps the factor rows where B and C are alike, 1 those where they differ",
        "bm_lora_diff_gamma": "gamma: how sharply likeness selects rows (0: no selection)",
        "bm_lora_diff_metadata": "Which metadata the LoRA extracted from two LoRAs carries",
        "bm_lora_diff": "Extract from the first two LoRAs of the list (B, then C) into a new file in the Lora folder",
        "bm_lora_name": "The file name of the new LoRA or checkpoint",
        "bm_lora_dtype": "The dtype of the merged or extracted LoRA file",
        "bm_lora_overwrite": "Replace a file of the same name",
        "bm_lora_message": "What the last LoRA action did, or why it was refused",
        "bm_lora_info": "The inspected LoRA: type, ranks, alpha, family and training metadata",
        "bm_method": "A merge method over a base (model A) and any number of models instead of the four merge modes: task arithmetic, TIES, DARE, DARE-TIES, DELLA, SLERP, Model Stock, geometric median, add perpendicular; its formula and paper are shown below",
        "bm_models": "The models merged into the base (model A), in the order picked; remove one with its x",
        "bm_model_weights": "One weight per model (comma separated) for methods that weigh the models; blank = equal weights",
        "bm_density": "density: the fraction of each task vector's entries kept (TIES, DELLA), by magnitude",
        "bm_drop": "drop: the probability of dropping each task-vector entry (DARE, DARE-TIES); the kept ones are scaled by 1/(1-drop)",
        "bm_epsilon": "epsilon: how much DELLA's drop probabilities spread with the entries' magnitude rank",
        "bm_weights_density": "density per block (numbers or a preset name), used with 'use MBW'",
        "bm_weights_drop": "drop per block (numbers or a preset name), used with 'use MBW'",
        "bm_weights_epsilon": "epsilon per block (numbers or a preset name), used with 'use MBW'",
        "bm_preset_density": "A named set of block weights used as density per block; fills the field and turns MBW on (density must stay in (0, 1])",
        "bm_preset_drop": "A named set of block weights used as drop per block; fills the field and turns MBW on (drop must stay in [0, 1))",
        "bm_preset_epsilon": "A named set of block weights used as epsilon per block; fills the field and turns MBW on",
        "bm_elemental_density": "Elemental rules for density: 'Blocks:Elements:Value', as the alpha elemental rules",
        "bm_elemental_drop": "Elemental rules for drop: 'Blocks:Elements:Value', as the alpha elemental rules",
        "bm_elemental_epsilon": "Elemental rules for epsilon: 'Blocks:Elements:Value', as the alpha elemental rules",
        "bm_gen_acc": "Generation after a merge; 0 or blank takes the value from txt2img",
        "bm_prompt": "Prompt of the test image (blank: txt2img's prompt)",
        "bm_negative": "Negative prompt of the test image (blank: txt2img's)",
        "bm_sampler": "Sampler (blank: txt2img's)",
        "bm_steps": "Sampling steps (0: txt2img's)",
        "bm_cfg": "CFG scale (0: txt2img's)",
        "bm_width": "Image width (0: txt2img's)",
        "bm_height": "Image height (0: txt2img's)",
        "bm_gen_seed": "Seed of the test image (-1: a new random seed)",
        "bm_batch": "Images per generation",
        "bm_xyz_acc": "X/Y/Z plot: a grid of images over merge settings; each distinct merge is made once",
        "bm_x_type": "What varies along X", "bm_x_values": "X values, separated by commas (see the help below)",
        "bm_y_type": "What varies along Y", "bm_y_values": "Y values, separated by commas",
        "bm_z_type": "What varies along Z (one grid per value)", "bm_z_values": "Z values, separated by commas",
        "bm_xyz_run": "Run the plot: merges, generates and draws the grids (Stop keeps the finished cells)",
        "bm_set_x": "Copy the alpha block weights into the X values (an mbw axis gets one more line)",
        "bm_set_y": "Copy the beta block weights into the Y values (an mbw axis gets one more line)",
        "bm_xyz_preset": "Saved plot settings (the six axis fields); type a name to save the current ones",
        "bm_xyz_preset_load": "Fill the X/Y/Z fields from the chosen plot preset",
        "bm_xyz_preset_save": "Save the X/Y/Z fields under this name, in your own presets file",
        "bm_xyz_preset_delete": "Delete this preset from your own presets file (shipped ones stay)",
        "bm_queue_add": "Queue the plot these settings describe (every setting is kept as it is now)",
        "bm_queue_run": "Run the waiting plots one after another; a failing one is marked and the next runs",
        "bm_queue_number": "The number of a waiting plot to remove; -1 removes every waiting plot",
        "bm_queue_remove": "Remove that waiting plot from the queue",
        "bm_queue": "Queued plots and what became of them",
        "bm_rand_mode": "How each block’s weight is drawn: R = r, U = 1.5-2r, X between the limits, D around a mid point; ER/EU/EX give every key of the block its own draw; custom = your template",
        "bm_rand_targets": "Which weights are drawn: alpha, beta or both",
        "bm_rand_extend": "SDXL: draw the 110 fine-block weights",
        "bm_rand_seed": "Weight seed; -1 gives each Run Rand cell a new one, a number gives seed, seed+1, ... Type a cell’s seed and press Random merge to redo it",
        "bm_rand_round": "Decimals of the drawn weights",
        "bm_rand_count": "How many cells (merges) Run Rand makes; rows of 10",
        "bm_rand_template": "custom: one token per block (numbers, R, U, X, D, ER, EU, EX) or a preset name such as ALL_R",
        "bm_rand_upper": "X: the upper limit; D: the mid point (one number, or one per block)",
        "bm_rand_lower": "X: the lower limit (xRp: x with probability p, else 0); D: the range",
        "bm_rand_clamp_upper": "Every drawn weight is at most this (blank: no limit)",
        "bm_rand_clamp_lower": "Every drawn weight is at least this (blank: no limit)",
        "bm_rand_load": "Copy the alpha block weights into the upper limit",
        "bm_rand_merge": "Merge once with weights drawn from the weight seed and load it",
        "bm_rand_file": "Merge once with weights drawn from the weight seed and save it (Options: name, dtype)",
        "bm_rand_run": "A plot of N merges, each with its own seed, shown above its cell and logged",
        "bm_rand_reserve": "Queue a Run Rand with these dice settings",
        "bm_rand_id": "The merge whose alpha weights 'Upper limit from merge ID' copies (-1 = the last merge)",
        "bm_rand_load_id": "Copy that logged merge’s alpha block weights into the upper limit (a merge without block weights gives its alpha)",
        "bm_rand_save_elist": "Random merge (and to file) also writes every key’s alpha and beta as a CSV beside the merge history (block_merger_elists)",
        "bm_rand_elist": "Drop an E-list CSV: the keys an Elemental rule set become Elemental rules with exactly those alphas (no seed needed)",
        "bm_gen_set_default": "Save these generation parameters as the defaults every page load starts with",
        "bm_gen_reset_default": "Forget the saved defaults: pages open with the tab’s own again",
        "bm_gen_reset_current": "Put the generation parameters back to the defaults now (the saved ones, else the tab’s own)",
        "bm_xyz_helpers": "Pick blocks, calc modes or checkpoints and add them to an axis, or draw seeds for a seed axis",
        "bm_xyz_pick_blocks": "Tick blocks: they form one cell (space separated) of a pinpoint or include/exclude axis",
        "bm_xyz_pick_calcs": "Tick calc modes for a calcmode axis",
        "bm_xyz_pick_models": "Tick checkpoints for a model_A/B/C axis",
        "bm_xyz_pick_refresh": "Read the checkpoint list again",
        "bm_xyz_selected": "What is ticked, as axis text; edit it if you like",
        "bm_xyz_add_x": "Add the selection to the X values as the next value(s)",
        "bm_xyz_add_y": "Add the selection to the Y values as the next value(s)",
        "bm_xyz_add_z": "Add the selection to the Z values as the next value(s)",
        "bm_xyz_seed_count": "How many distinct seeds '↑ Seeds to X' draws",
        "bm_xyz_seeds": "Make X a seed axis of that many drawn seeds (each shown, so any can be typed again)",
        "bm_recipe_acc": "The merge settings as text, to copy or paste back",
        "bm_recipe_text": "The recipe (JSON) of the controls; paste one here and press 'Load pasted settings'",
        "bm_recipe_copy": "Write the controls’ recipe into the box (copy it with the box’s copy button)",
        "bm_recipe_load": "Fill the Merge tab’s controls from the recipe pasted into the box",
        "bm_ext_text": "The 110 extended SDXL weights, one per fine block",
        "bm_ext_chart": "The 110 extended weights as a curve (hover a point for its block and value)",
        "bm_ext_from": "Expand the 20 (or 26) alpha block weights: every fine block takes its block’s value",
        "bm_ext_alpha": "Put the 110 weights into the alpha weights (MBW on, block type SDXL)",
        "bm_ext_beta": "Put the 110 weights into the beta weights",
        "bm_ext_BASE": "The fine-block weights of BASE, in order",
        "bm_ext_IN00": "The fine-block weights of IN00, in order",
        "bm_ext_IN01": "The fine-block weights of IN01, in order",
        "bm_ext_IN02": "The fine-block weights of IN02, in order",
        "bm_ext_IN03": "The fine-block weights of IN03, in order",
        "bm_ext_IN04": "The fine-block weights of IN04, in order",
        "bm_ext_IN05": "The fine-block weights of IN05, in order",
        "bm_ext_IN06": "The fine-block weights of IN06, in order",
        "bm_ext_IN07": "The fine-block weights of IN07, in order",
        "bm_ext_IN08": "The fine-block weights of IN08, in order",
        "bm_ext_M00": "The fine-block weights of M00, in order",
        "bm_ext_OUT00": "The fine-block weights of OUT00, in order",
        "bm_ext_OUT01": "The fine-block weights of OUT01, in order",
        "bm_ext_OUT02": "The fine-block weights of OUT02, in order",
        "bm_ext_OUT03": "The fine-block weights of OUT03, in order",
        "bm_ext_OUT04": "The fine-block weights of OUT04, in order",
        "bm_ext_OUT05": "The fine-block weights of OUT05, in order",
        "bm_ext_OUT06": "The fine-block weights of OUT06, in order",
        "bm_ext_OUT07": "The fine-block weights of OUT07, in order",
        "bm_ext_OUT08": "The fine-block weights of OUT08, in order",
        "bm_merge": "Merge into the loaded model (only the keys that changed since the last merge); Ctrl+Enter in the tab",
        "bm_merge_gen": "Merge into the loaded model, then generate with the parameters above",
        "bm_generate": "Generate with the loaded model (no merge)",
        "bm_stop": "Stop the running merge or plot: the previous weights are kept",
        "bm_save_file": "Merge straight into a file in the models folder (the loaded model is not touched); asks before replacing a file",
        "bm_save_current": "Write the merge that is loaded to a file",
        "bm_restore": "Put the base checkpoint's own weights back into the loaded model",
        "bm_message": "What the last action did, or why it could not",
        "bm_loaded": "The model loaded now: a merge (with its recipe hash) or the base checkpoint",
        "bm_merge_id": "The number of a merge in the history (-1: the last one)",
        "bm_load_settings": "Fill every control with the settings of that merge",
        "bm_gallery": "Images of the last generation or plot",
        "bm_infotext": "Generation parameters of the first image",
        "bm_inspect_acc": "Inspect a model: architecture, dtypes, size and merge recipe",
        "bm_inspect_model": "The model to describe",
        "bm_inspect": "Describe the chosen model",
        "bm_inspect_out": "The model's description",
        "bm_history_acc": "Every merge, with its recipe and settings",
        "bm_search": "Words to find in the history (blank: the latest merges)",
        "bm_search_mode": "and: rows with every word; or: rows with any word",
        "bm_search_btn": "Search the history, or reload it",
        "bm_history": "The merge history (newest first)",
        "bm_an_model_a": "Analysis: model A, the reference of every distance",
        "bm_an_model_b": "Analysis: model B, compared with A",
        "bm_an_model_c": "Analysis: model C (optional), compared with A and B",
        "bm_an_refresh": "Read the models folder again for the analysis choices",
        "bm_an_run": "Compare the models key by key (streamed: one tensor of each model in memory at a time)",
        "bm_an_stop": "Stop the running analysis at its next tensor",
        "bm_an_measure": "What the bar chart shows per block: relative L2 distance |X-Y|/|X|, the mean/min cosine similarity of the block's keys, the cosine of its attn2.to_out.0.weight (the seed's attn2 method), or ASimilarity",
        "bm_an_asim": "ASimilarity (the seed's default mode): each U-Net transformer block's self-attention run on one fixed random input (seed 2244096) in both models, and the cosine of the outputs; closer to how different the images look than weight cosines. SD1/SD2/SDXL",
        "bm_an_save": "Save the table shown (every block, then every key, full precision) as CSV in analysis/ next to the merge history; an earlier table is never replaced",
        "bm_an_file": "The last saved CSV, to download",
        "bm_an_message": "The models compared, and the keys skipped (missing or of another shape)",
        "bm_an_chart": "One group of bars per block (text encoder, U-Net blocks, VAE), one bar per pair of models",
        "bm_an_blocks": "Per block: keys compared, mean and min cosine similarity in percent, relative L2 distance, attn2 cosine, and ASimilarity when it ran",
        "bm_an_keys": "Per key: cosine similarity and relative L2 distance of every pair",
        "bm_el_model": "The model whose keys to list (only its header is read)",
        "bm_el_filter": "Keep keys holding this text, or of this block or fine label (attn2, OUT11, IN410)",
        "bm_el_ratio": "The ratio of the elemental rule a click adds",
        "bm_el_list": "List the keys with their block, shape and dtype",
        "bm_el_message": "How many keys match; what a click added",
        "bm_el_table": "Click a row to add Block:key:ratio to the Merge tab's Elemental field",
        "bm_md_model": "The model whose metadata to show",
        "bm_md_refresh": "Read the models folder again (a merge just saved appears)",
        "bm_el_refresh": "Read the models folder again (a merge just saved appears)",
        "bm_md_show": "Show the model's metadata: merge recipe, the models it came from, training metadata",
        "bm_md_text": "The metadata, one section per kind",
        "bm_img_files": "Drop PNG images generated with a merge: the first one's recipe fills the Merge tab",
        "bm_img_sm_history": "SuperMerger's mergehistory.csv: SuperMerger images record only a merge ID, whose recipe is in that file",
        "bm_img_message": "What each image holds, and which recipe was loaded",
        "bm_batch_count": "Batch count: how many batches (0: txt2img's)",
        "bm_restore_faces": "Restore faces: as txt2img (the WebUI's setting), on or off",
        "bm_tiling": "Tiling: as txt2img (the WebUI's setting), on or off",
        "bm_styles": "Prompt styles to apply (none chosen: txt2img's)",
        "bm_enable_hr": "Hires. fix: as txt2img's checkbox, on or off",
        "bm_hr_upscaler": "Hires fix upscaler (blank: txt2img's)",
        "bm_hr_steps": "Hires steps (0: txt2img's)",
        "bm_hr_denoise": "Hires denoising strength (0: txt2img's)",
        "bm_hr_scale": "Hires upscale factor (0: txt2img's)",
        "bm_txt2img_live": "The txt2img tab's live values, read when generating",
        "bm_helper_value": "The helper's value",
        "bm_helper_groups": "The block groups the helper changes: BASE, IN00-IN11, MID (M00), OUT00-OUT11",
        "bm_helper_set": "Set the ticked groups' weights to the value",
        "bm_helper_add": "Add the value to the ticked groups' weights",
        "bm_helper_mul": "Multiply the ticked groups' weights by the value",
        "bm_slider_min": "The block sliders' minimum (the text may hold any value)",
        "bm_slider_max": "The block sliders' maximum",
        "bm_slider_limits": "Give the 26 block sliders this range",
        "bm_user_presets": "Your presets file beside the shipped one (never written): NAME<tab>26 values per line",
        "bm_user_presets_save": "Check and save your presets; they join the preset list at once",
        "bm_user_presets_reload": "Read the preset files again (after editing them outside the tab)",
        "bm_cache": "The source checkpoints kept open for the next merges",
        "bm_cache_list": "Show the open models again",
        "bm_cache_clear": "Close every open model (the next merge opens its models again)",
        "bm_unload": "Move the model (and the merge in it) to RAM, freeing VRAM: the WebUI's Unload SD checkpoint to RAM",
        "bm_to_vram": "Move the model back to its device: the WebUI's Load SD checkpoint to VRAM"
    };

    // option hints, by the elem_id of the radio or checkbox group that holds them (JSON, checked like the above)
    const blockMergerOptionTitles = {
        "bm_mode": {
            "Weight sum": "A*(1-alpha)+B*alpha",
            "Add difference": "A+(B-C)*alpha (needs model C)",
            "Triple sum": "A*(1-alpha-beta)+B*alpha+C*beta (needs model C)",
            "sum Twice": "(A*(1-alpha)+B*alpha)*(1-beta)+C*beta (needs model C)"
        },
        "bm_calc": {
            "normal": "The merge mode's formula",
            "cosineA": "Per-column ratio from the cosine similarity of A and B, favouring A's structure",
            "cosineB": "Per-column ratio from the raw cosine similarity of A and B, favouring B's structure",
            "trainDifference": "A + 1.8*alpha*(B-C)*|B-A|/(|B-C|+|B-A|) (Add difference)",
            "smoothAdd": "A + alpha*gaussian(median(B-C)) (Add difference)",
            "smoothAdd MT": "smoothAdd on all cores (Add difference)",
            "extract": "Features of B-A and C-A chosen by their cosine similarity (beta, gamma)",
            "tensor": "Rows [beta, beta+alpha) of dim 0 taken from B",
            "tensor2": "Like tensor, slicing dim 1",
            "self": "A*alpha (B unused)",
            "plus random": "A + alpha*N(0,1) noise, seeded (B unused)"
        },
        "bm_save_flags": {
            "save model": "Merge also writes a file",
            "overwrite": "Replace a file of the same name (you are asked first)",
            "safetensors": "Write .safetensors (off: .ckpt)",
            "prune": "Leave out EMA and training-only keys",
            "save metadata": "Write the recipe and the models' hashes into the file",
            "Reset CLIP ids": "Write position_ids as 0..76",
            "copy config": "Copy model A's .yaml config beside the saved file (SD2-v and inpainting models need it)",
            "log ratios": "Print every key's block, alpha and beta to the console when merging (the seed's debug)"
        },
        "bm_inex": {
            "Off": "Merge every key",
            "Include": "Merge only the chosen blocks and elements",
            "Exclude": "Merge all but the chosen blocks and elements"
        }
    };

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function tabRoot() {
        return app().querySelector("#" + ROOT_ID);
    }

    function setTitle(element, text) {
        if (element && element.title !== text) element.title = text;
    }

    // Put every hint on its element, and on the texts inside it that the WebUI's hints.js titles by their words
    // (it knows "Seed" or "Add difference" from its own tabs): inside this tab, this tab's hint is the one shown.
    function applyTitles(root) {
        for (const [id, text] of Object.entries(blockMergerTitles)) {
            const element = root.querySelector("#" + id);
            if (!element) continue;
            setTitle(element, text);
            setTitle(element.querySelector("[data-testid='block-info']"), text); // the control's name
        }
        for (const [id, options] of Object.entries(blockMergerOptionTitles)) {
            const group = root.querySelector("#" + id);
            if (!group) continue;
            for (const label of group.querySelectorAll("label")) {
                const input = label.querySelector("input");
                const value = input && input.value !== "on" ? input.value : label.textContent.trim();
                if (!(value in options)) continue;
                setTitle(label, options[value]);
                label.querySelectorAll("span, input").forEach(e => setTitle(e, options[value]));
            }
        }
    }

    // gradio re-renders parts of the tab and hints.js adds its titles late: apply again after either (this
    // converges: applying sets only titles that differ).
    function watch(root) {
        applyTitles(root);
        let timer = null;
        new MutationObserver(function() {
            clearTimeout(timer);
            timer = setTimeout(function() {
                applyTitles(root);
            }, 200);
        }).observe(root, {childList: true, subtree: true, attributes: true, attributeFilter: ["title"]});
    }

    // The tab is rendered after the scripts run: wait for it.
    const waiting = setInterval(function() {
        const root = tabRoot();
        if (root && root.querySelector("#bm_merge")) {
            clearInterval(waiting);
            watch(root);
        }
    }, 250);

    // Ctrl+Enter inside the tab: Merge, or Merge to file where Merge is not available. Caught before the WebUI's
    // own Ctrl+Enter (which looks for a generate button and would press the tab's "Generate").
    window.addEventListener("keydown", function(e) {
        if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey) || e.altKey || e.shiftKey) return;
        const root = tabRoot();
        if (!root || !root.offsetParent) return; // the tab is hidden (another WebUI tab is open)
        const inside = root.contains(e.target) || e.target === document.body || e.target === document.documentElement;
        if (!inside) return;
        const merge = root.querySelector("#bm_merge");
        const button = merge && !merge.disabled ? merge : root.querySelector("#bm_save_file");
        if (!button || button.disabled) return;
        e.preventDefault();
        e.stopImmediatePropagation();
        if (e.target && e.target.blur) e.target.blur(); // a field being typed in commits its value first
        setTimeout(function() {
            button.click();
        }, 50);
    }, true);

    // The txt2img tab's current values by the WebUI's elem_ids (v1.10: the sampler and seed are scripts' fields,
    // the hires fix an InputAccordion whose state is a hidden checkbox). Missing elements are left out.
    window.blockMergerTxt2img = function() {
        const doc = app();
        const out = {};
        const field = function(id) {
            return doc.querySelector("#" + id + " textarea, #" + id + " input[type=number], #" + id + " input");
        };
        const text = {prompt: "txt2img_prompt", negative_prompt: "txt2img_neg_prompt", sampler: "txt2img_sampling",
            scheduler: "txt2img_scheduler", hr_upscaler: "txt2img_hr_upscaler"};
        const numbers = {steps: "txt2img_steps", cfg_scale: "txt2img_cfg_scale", width: "txt2img_width",
            height: "txt2img_height", batch_count: "txt2img_batch_count", batch_size: "txt2img_batch_size",
            hr_steps: "txt2img_hires_steps", denoising: "txt2img_denoising_strength", hr_scale: "txt2img_hr_scale"};
        Object.keys(text).forEach(function(name) {
            const el = field(text[name]);
            if (el) out[name] = el.value;
        });
        Object.keys(numbers).forEach(function(name) {
            const el = field(numbers[name]);
            if (el && el.value !== "" && !isNaN(Number(el.value))) out[name] = Number(el.value);
        });
        const hires = doc.querySelector("#txt2img_hr-checkbox input[type=checkbox]");
        if (hires) out.enable_hr = hires.checked;
        const styles = doc.querySelector("#txt2img_styles");
        if (styles) {
            out.styles = Array.from(styles.querySelectorAll(".token span")).map(function(s) {
                return s.textContent.trim();
            }).filter(Boolean);
        }
        return out;
    };

    // Asked by the tab (tab.CONFIRM_OVERWRITE_JS) with the file "Merge to file" would replace ("" if none).
    window.blockMergerConfirmOverwrite = function(path) {
        if (!path) return true;
        return window.confirm("Block Merger: " + path + " exists.\n\nReplace it with the new merge?");
    };

    // The weights text after the block slider at `position` (of 26) moved: ui/values.py's slider_moved, run in the
    // page (tab.slider_to_text_js). A server round trip could be lost: gradio 3.41 drops an event while the same one
    // is still pending, so a value typed into a slider's number box and left at once never reached the text. Only
    // the moved block's token changes, and it keeps its own text while the slider still shows it (GRAD_V's
    // 0.9166666667 stays); a text that is not a complete list (a preset name, a list being typed) is rebuilt from
    // every slider. `visible`: the positions the text lists, in its order (26 for SD1, 20 for SDXL); `sliders`: the
    // 26 slider values (gradio appends the output's current value after the inputs: ignored).
    window.blockMergerSliderMoved = function(position, visible, text, sliders) {
        const fmt = (value) => String(Math.round(Number(value) * 1e4) / 1e4 || 0);  // as values.fmt; no "-0"
        const number = (token) => (token === "" || !isFinite(Number(token)) ? null : Number(token));
        const tokens = String(text || "").replace(/\n/g, ",").split(",").map((token) => token.trim());
        if (tokens.length && tokens[tokens.length - 1] === "") tokens.pop();  // one trailing comma
        const index = visible.indexOf(position);
        if (tokens.length !== visible.length || index < 0) {
            return visible.map((p) => fmt(sliders[p])).join(",");
        }
        const old = number(tokens[index]), value = Number(sliders[position]);
        if (old === null || Math.round(old * 1000) !== Math.round(value * 1000)) tokens[index] = fmt(value);
        return tokens.join(",");
    };
})();
