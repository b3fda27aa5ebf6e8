# Evaluates the repository's flake.nix against the nixpkgs stand-in and reports, as JSON-ready data,
# what each package, the dev shell and the NixOS module output consist of.
let
  nixpkgs = {
    outPath = ./.;
    lib = import ./lib.nix;
  };
  flake = import ../../../flake.nix;
  outputs = flake.outputs {
    self = outputs;
    inherit nixpkgs;
  };
  describe = package: {
    inherit (package) pname version makeWrapperArgs;
    dependencies = map (d: d.name) package.dependencies;
    inherit (package.meta) mainProgram platforms;
  };
  shell = outputs.devShells.x86_64-linux.default;
in
{
  nixpkgsUrl = flake.inputs.nixpkgs.url;
  packageNames = builtins.mapAttrs (system: packages: builtins.attrNames packages) outputs.packages;
  packages = builtins.mapAttrs (system: packages: builtins.mapAttrs (name: describe) packages) outputs.packages;
  devShellPython = map (p: p.name) (builtins.head shell.packages).packages;
  nixosModule = toString outputs.nixosModules.default;
}
