{
  description = "ringlet: pool your devices (Apple Silicon, NVIDIA, Intel GPUs, CPUs) into one LLM cluster";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      mkRingletPackage = import ./nix/package.nix;

      # CUDA is unfree; allowing unfree packages changes nothing for the cpu and ipex builds.
      pkgsFor =
        system:
        import nixpkgs {
          inherit system;
          config.allowUnfree = true;
        };

      # Which accelerators each system can build (PyTorch builds for Intel GPUs exist for x86_64 only).
      accelerators = {
        x86_64-linux = [
          "cpu"
          "cuda"
          "ipex"
        ];
        aarch64-linux = [
          "cpu"
          "cuda"
        ];
        aarch64-darwin = [ "cpu" ];
      };

      forAllSystems = f: lib.genAttrs (builtins.attrNames accelerators) (system: f system (pkgsFor system));
    in
    {
      lib = { inherit mkRingletPackage; };

      packages = forAllSystems (
        system: pkgs:
        let
          byAccelerator = lib.genAttrs accelerators.${system} (
            accelerator: mkRingletPackage { inherit pkgs accelerator; }
          );
        in
        lib.mapAttrs' (accelerator: package: lib.nameValuePair "ringlet-${accelerator}" package) byAccelerator
        // {
          default = byAccelerator.cpu;
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            packages = [
              (pkgs.python3.withPackages (
                ps:
                self.packages.${system}.ringlet-cpu.runtimeDependencies
                ++ (with ps; [
                  pytest
                  pytest-timeout
                  hypothesis
                  httpx
                  transformers
                  openai
                  ollama
                ])
              ))
              pkgs.ruff
            ];
            # run ringlet from the checkout: python -m ringlet ...
            shellHook = ''
              export PYTHONPATH="$PWD''${PYTHONPATH:+:$PYTHONPATH}"
            '';
          };
        }
      );

      nixosModules.default = ./nix/module.nix;
      nixosModules.ringlet = ./nix/module.nix;
    };
}
