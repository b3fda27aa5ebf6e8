# A stand-in for `import nixpkgs { system; config; }`: packages are named placeholders, and the
# Python builders return their arguments so that a test can read what ringlet's Nix code asked for.
{
  system ? "x86_64-linux",
  config ? { },
}:
let
  lib = import ./lib.nix;
  placeholder = name: {
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
  named = names: lib.genAttrs names placeholder;
  built = attrs: attrs // attrs.passthru or { } // placeholder (attrs.pname or "built");
  pythonPackages =
    named [
      "torch" "torchWithCuda" "setuptools" "safetensors" "gguf" "tokenizers" "jinja2" "numpy"
      "pydantic" "fastapi" "uvicorn" "zenoh" "msgpack" "prometheus-client" "huggingface-hub" "rich"
      "psutil" "nvidia-ml-py" "pytest" "pytest-timeout" "hypothesis" "httpx" "transformers" "openai"
      "ollama" "httptools" "uvloop" "cryptography" "filelock" "ninja"
    ]
    // {
      buildPythonApplication = built;
      buildPythonPackage = built;
    };
in
named [ "level-zero" "intel-media-driver" "ruff" ]
// {
  inherit lib system config;
  intel-compute-runtime = placeholder "intel-compute-runtime" // {
    drivers = placeholder "intel-compute-runtime-drivers";
  };
  fetchurl = { url, hash }: placeholder "fetched" // { inherit url hash; };
  python3 = placeholder "python3" // {
    pkgs = pythonPackages;
    withPackages = f: placeholder "python3-env" // { packages = f pythonPackages; };
  };
  mkShell = attrs: placeholder "shell" // attrs;
}
