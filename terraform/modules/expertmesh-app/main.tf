# expertmesh on a cluster that already runs the KubeRay operator and
# kube-prometheus-stack: its namespace and Secrets, the KubeRay manifests of
# infra/k8s (the single source of truth: only the image and the model source
# are swapped in) and the Grafana dashboard.

locals {
  repo_root = "${path.module}/../../.."

  manifest_files = concat(
    [
      "models-pvc.yaml",
      "networkpolicy.yaml",
      "model-loader-job.yaml",
      "rayservice.yaml",
      "monitoring/podmonitor-ray.yaml",
    ],
    var.apply_finetune_job ? ["rayjob-finetune.yaml"] : [],
  )

  # One entry per YAML document, keyed by file and object so for_each keys
  # are known at plan time.
  manifest_documents = merge([
    for manifest, docs in data.kubectl_file_documents.expertmesh : {
      for self_link, body in docs.manifests : "${manifest}:${self_link}" => body
    }
  ]...)
}

resource "random_password" "api_key" {
  length  = 48
  special = false # travels in an HTTP header
}

resource "kubernetes_namespace" "expertmesh" {
  metadata {
    name = "expertmesh"
    labels = {
      "app.kubernetes.io/part-of" = "expertmesh"
    }
  }
}

# The Ray Serve ingress checks the Bearer token against this key.
resource "kubernetes_secret" "api_key" {
  metadata {
    name      = "expertmesh-api-key"
    namespace = kubernetes_namespace.expertmesh.metadata[0].name
  }

  type = "Opaque"
  data = {
    "api-key" = random_password.api_key.result
  }
}

# Ray's token auth. The RayService and the RayJob name this Secret in
# authOptions.secretName (the KubeRay operator sends the token with its Serve
# deploys and job calls) and take RAY_AUTH_TOKEN from it on the head, the
# workers and the RayJob's submitter: nobody without it reaches the GCS, the
# dashboard or the job API of the Ray clusters.
resource "random_password" "ray_auth_token" {
  length  = 48
  special = false # travels in an HTTP header
}

resource "kubernetes_secret" "ray_auth" {
  metadata {
    name      = "expertmesh-ray-auth"
    namespace = kubernetes_namespace.expertmesh.metadata[0].name
  }

  type = "Opaque"
  data = {
    auth_token = random_password.ray_auth_token.result
  }
}

# Read by the model-loader Job as a file; only made when a token is given.
resource "kubernetes_secret" "hf_token" {
  count = var.hf_token == "" ? 0 : 1

  metadata {
    name      = "expertmesh-hf-token"
    namespace = kubernetes_namespace.expertmesh.metadata[0].name
  }

  type = "Opaque"
  data = {
    token = var.hf_token
  }
}

data "kubectl_file_documents" "expertmesh" {
  for_each = toset(local.manifest_files)

  # The manifests name the image `expertmesh:0.1.0` and the loader's source `builtin:tiny`: put ours in.
  content = replace(
    replace(file("${local.repo_root}/infra/k8s/${each.key}"), "expertmesh:0.1.0", var.image),
    "value: builtin:tiny", "value: ${var.model_source}",
  )
}

resource "kubectl_manifest" "expertmesh" {
  for_each = local.manifest_documents

  yaml_body         = each.value
  server_side_apply = true
  wait              = true
  # Jobs and RayJobs are immutable once started: a new image means a new run.
  force_new = contains(["Job", "RayJob"], yamldecode(each.value).kind)

  depends_on = [
    kubernetes_namespace.expertmesh,
    kubernetes_secret.api_key,
    kubernetes_secret.ray_auth,
    kubernetes_secret.hf_token,
  ]
}

resource "kubernetes_config_map" "grafana_dashboard" {
  metadata {
    name      = "expertmesh-moe-dashboard"
    namespace = var.monitoring_namespace
    labels = {
      # Picked up by the Grafana dashboard sidecar of kube-prometheus-stack.
      grafana_dashboard = "1"
    }
  }

  data = {
    "expertmesh-moe.json" = file("${local.repo_root}/infra/grafana/expertmesh-moe.json")
  }
}
