// sd-webui-instantid: tooltips for the InstantID panel (the webui loads every file in javascript/).
(function () {
    const TIPS = {
        "image": "A clear photo of the face. The largest face is used unless you pick another below.",
        "pose": "Optional: a photo whose face keypoints set the head position and size. Empty = the face photo's.",
        "images": "More photos of the same person; their face embeddings are averaged with the first photo's.",
        "adapter": "InstantID's ip-adapter.bin (models/instantid or models/ControlNet).",
        "identitynet": "InstantID's ControlNet (the ControlNetModel folder or control_instant_id_sdxl.safetensors).",
        "weight": "How strongly the face tokens steer the image. 0.8 is a good start; lower it if the image looks burnt.",
        "start": "Fraction of the sampling steps where the face adapter starts acting.",
        "end": "Fraction of the sampling steps where the face adapter stops acting.",
        "identitynet_strength": "How strongly IdentityNet holds the face's keypoints and identity. 0.8 is a good start.",
        "identitynet_start": "Fraction of the sampling steps where IdentityNet starts acting.",
        "identitynet_end": "Fraction of the sampling steps where IdentityNet stops acting.",
        "face": "Which face of the photo: the largest, or its index counted from the left (0 = leftmost).",
        "hires_adapter": "Also use the face adapter in the hires-fix second pass.",
        "hires_identitynet": "Also use IdentityNet in the hires-fix second pass (keypoints are redrawn at the hires size).",
        "detect": "Show the face that will be used (green box) and its keypoint map.",
        "free": "Free the InstantID models from memory (they are loaded again when needed).",
        "unit_enabled": "Use this unit. Several units act together (for example InstantID plus an IP-Adapter style image).",
        "weight_type": "How the weight is spread over the UNet's layers: style transfer and composition target the layers that carry them.",
        "encoder": "The CLIP image encoder for IP-Adapter models. Auto picks the one the adapter was trained with.",
        "variant": "Override the guess where the weights cannot tell variants apart (e.g. FaceID-Plus v1 vs v2).",
        "combine": "Several photos: average their embeddings, or put their tokens one after the other.",
        "composition_weight": "For the 'style and composition' weight types: the weight of the composition layers.",
        "lora_strength": "FaceID files carry a LoRA, applied automatically (no <lora:...> needed). 1 = as trained.",
        "s_scale": "FaceID-Plus v2 only: how much of the face structure comes from the CLIP image.",
        "negative": "Optional: an image whose encoding replaces the empty input on the negative side.",
        "mask": "Optional: where this unit acts (white) and where not (black).",
    };

    function addTips() {
        for (const tab of ["txt2img", "img2img"]) {
            for (const [key, text] of Object.entries(TIPS)) {
                // unit 1 uses plain ids, units 2..8 are prefixed u1_ ... u7_
                const ids = [`script_${tab}_instantid_${key}`];
                for (let unit = 1; unit < 8; unit++) {
                    ids.push(`script_${tab}_instantid_u${unit}_${key}`);
                }
                for (const id of ids) {
                    const el = gradioApp().getElementById(id);
                    if (el && !el.title) {
                        el.title = text;
                    }
                }
            }
        }
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(addTips);
    }
})();
