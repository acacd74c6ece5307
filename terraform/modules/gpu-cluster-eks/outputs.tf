output "cluster_name" {
  description = "EKS cluster name."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint (https URL)."
  value       = module.eks.cluster_endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64-encoded CA certificate of the API server, for provider configuration."
  value       = module.eks.cluster_certificate_authority_data
}

output "region" {
  description = "AWS region the cluster runs in."
  value       = data.aws_region.current.name
}

output "kubeconfig_command" {
  description = "Command that writes a kubeconfig entry for this cluster."
  value       = "aws eks update-kubeconfig --region ${data.aws_region.current.name} --name ${module.eks.cluster_name}"
}

output "models_storage_class" {
  description = "Name of the ReadWriteMany StorageClass for the model-weights PVC."
  value       = kubernetes_storage_class.models.metadata[0].name
}

output "efs_file_system_id" {
  description = "ID of the EFS file system behind the models StorageClass."
  value       = aws_efs_file_system.models.id
}

output "vpc_id" {
  description = "ID of the VPC the cluster runs in."
  value       = module.vpc.vpc_id
}

output "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider, for further IRSA roles."
  value       = module.eks.oidc_provider_arn
}

output "monitoring_namespace" {
  description = "Namespace of kube-prometheus-stack; Grafana dashboards ConfigMaps go here."
  value       = module.kuberay_stack.monitoring_namespace
}

output "gpu_node_group_names" {
  description = "Names of the GPU node groups (also their expertmesh.io/pool label values)."
  value       = [for g in var.gpu_node_groups : g.name]
}
