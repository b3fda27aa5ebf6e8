# The few nixpkgs `lib` functions that flake.nix and nix/*.nix call, reduced to what a test can
# inspect. nixpkgs itself cannot be fetched here (no internet), so this stands in for it.
let
  inherit (builtins) concatStringsSep elem listToAttrs map;
in
rec {
  genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
  mapAttrs' = f: set: listToAttrs (map (n: f n set.${n}) (builtins.attrNames set));
  nameValuePair = name: value: { inherit name value; };
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: set: if cond then set else { };
  assertOneOf = name: value: allowed: elem value allowed || throw "${name} must be one of ${toString allowed}";
  importTOML = path: builtins.fromTOML (builtins.readFile path);
  makeLibraryPath = paths: concatStringsSep ":" (map (p: "${p}/lib") paths);
  getExe = package: "${package}/bin/${package.meta.mainProgram}";
  literalExpression = text: { _type = "literalExpression"; inherit text; };
  fileset = {
    toSource = { root, fileset }: root;
    unions = paths: paths;
    maybeMissing = path: path;
  };
  platforms = {
    linux = [ "x86_64-linux" "aarch64-linux" ];
    darwin = [ "aarch64-darwin" ];
  };
  licenses.asl20 = "asl20";

  # NixOS module system: options are returned as written, mkIf keeps its content only when true.
  mkOption = attrs: attrs;
  mkEnableOption = description: { type = "bool"; default = false; inherit description; };
  mkIf = cond: content: if cond then content else { };
  types = {
    bool = "bool";
    str = "str";
    port = "port";
    package = "package";
    enum = values: { enum = values; };
    nullOr = type: { nullOr = type; };
    listOf = type: { listOf = type; };
  };
}
