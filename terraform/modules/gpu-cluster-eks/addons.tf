# In-cluster add-ons. Chart versions are pinned literally (not variables) so a
# plan never pulls a chart nobody reviewed.

locals {
  cluster_autoscaler_sa = "cluster-autoscaler"
  monitoring_namespace  = "monitoring"

  gpu_toleration = {
    key      = "nvidia.com/gpu"
    operator = "Exists"
    effect   = "NoSchedule"
  }

  # Cluster-wide daemons stay off GPU nodes unless they must run there.
  system_node_selector = {
    "expertmesh.io/pool" = "system"
  }
}

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  namespace  = "kube-system"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = "9.46.6"

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = data.aws_region.current.name
    autoDiscovery = {
      # Managed node groups tag their ASGs with k8s.io/cluster-autoscaler/<name>.
      clusterName = module.eks.cluster_name
    }
    rbac = {
      serviceAccount = {
        create = true
        name   = local.cluster_autoscaler_sa
        annotations = {
          "eks.amazonaws.com/role-arn" = module.cluster_autoscaler_irsa.iam_role_arn
        }
      }
    }
    nodeSelector = local.system_node_selector
    extraArgs = {
      expander                      = var.cluster_autoscaler_expander
      "balance-similar-node-groups" = true
      "skip-nodes-with-system-pods" = false
      "scale-down-unneeded-time"    = var.scale_down_unneeded_time
      # A freshly added GPU node spends minutes pulling the image and loading
      # weights; do not consider removing it before then.
      "scale-down-delay-after-add" = "15m"
      # Cluster-wide GPU ceiling. The GPU type is matched against the value of
      # the k8s.amazonaws.com/accelerator label every GPU group carries.
      "gpu-total" = "${var.gpu_accelerator_label}:0:${var.max_total_gpus}"
    }
  })]

  depends_on = [module.eks]
}

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = "0.17.1"

  values = [yamlencode({
    # Only GPU nodes; they carry the nvidia.com/gpu taint, hence the toleration.
    nodeSelector = {
      "nvidia.com/gpu.present" = "true"
    }
    tolerations = [local.gpu_toleration]
  })]

  depends_on = [module.eks]
}

resource "helm_release" "kube_prometheus_stack" {
  name             = "kube-prometheus-stack"
  namespace        = local.monitoring_namespace
  create_namespace = true
  repository       = "https://prometheus-community.github.io/helm-charts"
  chart            = "kube-prometheus-stack"
  version          = "75.12.0"

  values = [yamlencode({
    prometheus = {
      prometheusSpec = {
        # Select every PodMonitor/ServiceMonitor/PrometheusRule in the cluster,
        # not just those labelled with this release (the Ray PodMonitor and the
        # DCGM ServiceMonitor are not).
        podMonitorSelectorNilUsesHelmValues     = false
        serviceMonitorSelectorNilUsesHelmValues = false
        ruleSelectorNilUsesHelmValues           = false
        retention                               = "15d"
        nodeSelector                            = local.system_node_selector
      }
    }
    grafana = {
      nodeSelector = local.system_node_selector
      sidecar = {
        dashboards = {
          # Loads every ConfigMap labelled grafana_dashboard: "1", e.g. the
          # expertmesh MoE dashboard the examples create.
          enabled         = true
          label           = "grafana_dashboard"
          labelValue      = "1"
          searchNamespace = "ALL"
        }
      }
    }
    # Managed control plane: these targets cannot be scraped from inside the
    # cluster and would only fire alerts.
    kubeControllerManager = { enabled = false }
    kubeScheduler         = { enabled = false }
    kubeEtcd              = { enabled = false }
  })]

  set_sensitive {
    name  = "grafana.adminPassword"
    value = var.grafana_admin_password
  }

  depends_on = [module.eks]
}

resource "helm_release" "dcgm_exporter" {
  name       = "dcgm-exporter"
  namespace  = local.monitoring_namespace
  repository = "https://nvidia.github.io/dcgm-exporter/helm-charts"
  chart      = "dcgm-exporter"
  version    = "4.1.0"

  values = [yamlencode({
    nodeSelector = {
      "nvidia.com/gpu.present" = "true"
    }
    tolerations = [local.gpu_toleration]
    serviceMonitor = {
      enabled = true
    }
  })]

  # The ServiceMonitor CRD comes with kube-prometheus-stack.
  depends_on = [helm_release.kube_prometheus_stack]
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  namespace        = "kuberay-system"
  create_namespace = true
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  # Must match the KubeRay CRDs vendored by expertmesh (1.7).
  version = "1.7.0"

  values = [yamlencode({
    nodeSelector = local.system_node_selector
  })]

  depends_on = [module.eks]
}
